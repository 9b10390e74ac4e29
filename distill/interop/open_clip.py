"""open_clip layout of a two-tower student: ``open_clip.create_model_and_transforms("local-dir:OUT")``
and ``open_clip.get_tokenizer("local-dir:OUT")`` give the student's embeddings and preprocessing.

``OUT/open_clip_config.json`` holds ``model_cfg`` + ``preprocess_cfg``, ``OUT/open_clip_model.safetensors``
the weights, and tokenizer files sit in OUT itself (where ``get_tokenizer("local-dir:")`` looks).
- Image towers are timm trunks (``timm_model_name``) whose own classifier is the projection head. Non-default
  ``model_kwargs`` (image size, patch size, depth) are not open_clip config keys, so the trunk is named
  ``local-dir:OUT/timm`` (timm's config with ``model_args``).
- Text towers: a transformers encoder through ``hf_model_name`` = OUT/text (its HF config) with the same
  pooler and a bias-free linear projection (a head bias is folded into the last LayerNorm when that is
  exact, refused otherwise); or, for a student paired with an open_clip teacher, that teacher's own
  text tower config.
open_clip resolves ``timm_model_name`` and ``hf_model_name`` as given, so those two are absolute paths:
a student that needs them loads wherever the export was written; after moving the folder, export it again
from there into a new folder (``load_student`` reads it from its own files).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from .._imports import require
from ..errors import ExportError
from ..io import save_tensors, write_json
from .parity import agreement, calibration_inputs, parity_images
from .registry import Format, register_format

CONFIG = "open_clip_config.json"
USAGE = ('import open_clip\nmodel, _, preprocess = open_clip.create_model_and_transforms("local-dir:{path}")\n'
         'tokenizer = open_clip.get_tokenizer("local-dir:{path}")')
WEIGHTS = "open_clip_model.safetensors"
_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}  # open_clip's names, same maths
_EVAL_ONLY = ("drop_rate", "drop_path_rate", "proj_drop_rate", "attn_drop_rate", "pos_drop_rate", "patch_drop_rate")


def _vision_cfg(tower: Any, out: Path) -> tuple[dict[str, Any], nn.Module]:
    from timm.models._input import _get_global_pool

    from .timm import timm_config, timm_model

    model = timm_model(tower)
    kwargs = {k: v for k, v in (tower.spec.get("model_kwargs") or {}).items() if k not in _EVAL_ONLY}
    default_size = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if kwargs.get("img_size") in (default_size, [default_size] * 2, (default_size,) * 2):
        del kwargs["img_size"]  # the architecture's own size: the plain name builds it
    name = tower.spec["timm_name"]
    if kwargs:  # timm builds these only from its own config's model_args
        write_json(out / "timm" / "config.json", timm_config(model, tower))
        name = f"local-dir:{(out / 'timm').resolve()}"
    cfg = {"timm_model_name": name, "timm_model_pretrained": False, "timm_pool": _get_global_pool(model),
           "timm_proj": None,  # no extra projection: the trunk's classifier (num_classes=embed_dim) is the head
           "image_size": tower.preprocess.image_size}
    return cfg, model


def _last_layer_norm(encoder: nn.Module) -> tuple[str, nn.LayerNorm] | None:
    # post-LN encoders (BERT family) end on a LayerNorm: last_hidden_state = gamma * x_hat + beta
    norms = [(n, m) for n, m in encoder.named_modules() if isinstance(m, nn.LayerNorm)]
    return norms[-1] if norms else None


def fold_text_bias(text: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(encoder state, projection weight) with the head bias moved into the encoder's last LayerNorm
    beta: W (gamma x_hat + beta + d) = W (gamma x_hat + beta) + b when W d = b, and every pooling
    (mean, max, cls) passes a per-feature constant through. Raises ExportError when no exact d exists."""
    state = {k: v.detach().clone() for k, v in text.encoder.state_dict().items()}
    weight, bias = text.proj.weight.detach(), text.proj.bias
    if bias is None or not bias.detach().abs().max() > 0:
        return state, weight.clone()
    found = _last_layer_norm(text.encoder)
    W, b = weight.double(), bias.detach().double()
    d = torch.linalg.lstsq(W, b.unsqueeze(-1)).solution.squeeze(-1) if found else None
    if d is None or (W @ d - b).abs().max() > 1e-6 * max(1.0, float(b.abs().max())):
        raise ExportError(
            f"text tower {text.spec.get('arch')!r}: its projection has a bias and open_clip's text projection has "
            f"none; the bias cannot be folded exactly ({text.proj.in_features}-d encoder -> {text.proj.out_features}-d "
            "embedding: the bias is not in the span of the projection). Export with --format sentence-transformers "
            "or onnx, or retrain with a bias-free head (the default for new text students).")
    state[f"{found[0]}.bias"] += d.to(state[f"{found[0]}.bias"].dtype)
    return state, weight.clone()


def _text_cfg(text: Any, out: Path) -> dict[str, Any]:
    from ..students import TextTower

    if not isinstance(text, TextTower):  # a paired open_clip teacher's tower: its own config
        if hasattr(text.tokenizer, "save_pretrained"):
            text.tokenizer.save_pretrained(str(out))
        return dict(text.spec["model_cfg"]["text_cfg"])
    if text.pooling not in _POOLERS:
        raise ExportError(f"text tower {text.spec.get('arch')!r}: {text.pooling} pooling has no working open_clip pooler "
                          "(open_clip 3.3's MaxPooler fails on its own attention mask); export with "
                          "--format sentence-transformers or onnx")
    model_type = text.encoder.config.model_type
    from open_clip.hf_configs import arch_dict

    if model_type not in arch_dict:
        raise ExportError(f"text encoder type {model_type!r}: open_clip's HF text towers support {sorted(arch_dict)}")
    text.encoder.config.save_pretrained(str(out / "text"))
    text.tokenizer.save_pretrained(str(out))  # get_tokenizer("local-dir:OUT") reads OUT itself
    folder = str((out / "text").resolve())
    return {"hf_model_name": folder, "hf_tokenizer_name": folder, "hf_model_pretrained": False,
            "hf_proj_type": "linear", "hf_pooler_type": _POOLERS[text.pooling], "context_length": text.context_length}


def preprocess_cfg(pre: Any) -> dict[str, Any]:
    return {"size": pre.image_size, "mode": "RGB", "mean": list(pre.mean), "std": list(pre.std),
            "interpolation": pre.interpolation, "resize_mode": pre.resize_mode, "fill_color": 0}


@torch.no_grad()
def export_open_clip(student: Any, out: Path) -> None:
    """Write the student (two towers, or an image tower paired with a teacher's text tower) as an
    open_clip ``local-dir:`` folder."""
    from ..students import TextTower

    open_clip = require("open_clip", "open_clip exports")
    if student.image is None or student.text is None:
        raise ExportError(f"the open_clip format needs an image and a text tower; this student has only its "
                          f"{student.modality} tower (pair an image student with --pair-teacher; text students: "
                          "--format sentence-transformers)")
    if "timm_name" not in student.image.spec:
        raise ExportError(f"image tower {student.image.spec.get('arch')!r}: only timm image towers have an open_clip layout")
    out.mkdir(parents=True, exist_ok=True)
    vision_cfg, trunk = _vision_cfg(student.image, out)
    text_cfg = _text_cfg(student.text, out)
    model_cfg: dict[str, Any] = {"embed_dim": student.embed_dim, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if not isinstance(student.text, TextTower):
        model_cfg.update({k: v for k, v in student.text.spec["model_cfg"].items() if k not in model_cfg})
        model_cfg["embed_dim"] = student.embed_dim
    config: dict[str, Any] = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg(student.preprocess)}
    paths = [v for v in (vision_cfg["timm_model_name"], text_cfg.get("hf_model_name")) if v and str(out.resolve()) in v]
    if paths:  # open_clip ignores other keys: a note for whoever finds the folder moved
        config["clip_distill"] = {"absolute_paths": paths, "after_moving_this_folder": (
            "open_clip reads these paths as they are; where the folder now is, run `distill export <this folder> "
            "--format open_clip --out <a new folder>` once and use the new folder")}
    write_json(out / CONFIG, config)
    # open_clip builds the model from that config; it is filled with the student's weights and saved
    model = open_clip.create_model(f"local-dir:{out}", load_weights=False, pretrained_text=False)
    model.visual.trunk.load_state_dict(trunk.state_dict(), strict=True)
    if isinstance(student.text, TextTower):
        encoder_state, weight = fold_text_bias(student.text)
        model.text.transformer.load_state_dict(encoder_state, strict=True)
        model.text.proj.weight.copy_(weight)
    else:
        tower = model.text if hasattr(model, "text") else model  # CustomTextCLIP holds it as .text, CLIP flat
        missing, unexpected = tower.load_state_dict(student.text.encoder.state_dict(), strict=False)
        if unexpected or any(not k.startswith(("visual.", "logit_")) for k in missing):
            raise ExportError(f"the paired open_clip text tower does not fit its config (missing {missing}, "
                              f"unexpected {unexpected})")
        if "logit_scale" in student.text.spec:
            model.logit_scale.fill_(float(student.text.spec["logit_scale"]))
    save_tensors(out / WEIGHTS, model.state_dict(), metadata={"format": "pt"})


def relocate(folder: str | Path, where: str | Path) -> None:
    """Point the absolute paths of the open_clip export in ``folder`` at ``where``, the place the folder is
    moved to (open_clip reads ``timm_model_name`` / ``hf_model_name`` as they are written)."""
    from ..io import read_json

    config = Path(folder) / CONFIG
    old, new = str(Path(folder).resolve()), str(Path(where).resolve())
    cfg = read_json(config)

    def moved(value: Any) -> Any:
        if isinstance(value, str):
            for prefix in ("", "local-dir:"):
                if value.startswith(prefix + old) and value[len(prefix + old):len(prefix + old) + 1] in ("", "/"):
                    return prefix + new + value[len(prefix + old):]
            return value
        if isinstance(value, list):
            return [moved(v) for v in value]
        if isinstance(value, dict):
            return {k: moved(v) for k, v in value.items()}
        return value

    write_json(config, moved(cfg))


@torch.no_grad()
def open_clip_parity(out: Path, pixels: torch.Tensor | None, texts: Sequence[str] | None) -> dict[str, Any]:
    """Load ``out`` with open_clip alone; its (normalised) image / text embeddings and its preprocess."""
    open_clip = require("open_clip", "the open_clip check")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    model.eval()
    got: dict[str, Any] = {"preprocess": preprocess, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    if pixels is not None:
        got["image"] = model.encode_image(pixels, normalize=True)
    if texts is not None:
        tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
        got["text"] = model.encode_text(tokenizer(list(texts)), normalize=True)
    return got


def _same(key: str, a: Any, b: Any) -> bool:
    if key == "size":  # open_clip keeps (H, W)
        a, b = [tuple(v) if isinstance(v, (list, tuple)) else (v, v) for v in (a, b)]
    if key in ("size", "mean", "std"):
        return len(a) == len(b) and bool(np.allclose(a, b))
    return a == b


@torch.no_grad()
def preprocess_check(student: Any, got: dict[str, Any], pil_images: list) -> dict[str, Any]:
    """open_clip's preprocess config and pixels vs the student's eval transform on ``pil_images``: the
    student's embeddings of its own pixels against those of open_clip's (gated like every tower)."""
    keys = ("size", "mean", "std", "interpolation", "resize_mode")
    want, have = preprocess_cfg(student.preprocess), got["preprocess_cfg"]
    ours = torch.stack([student.image_transform(im) for im in pil_images])
    theirs = torch.stack([got["preprocess"](im) for im in pil_images])
    stats = agreement(student.encode_image(ours).numpy(), student.encode_image(theirs).numpy())
    return {"keys": list(keys), "config_match": all(_same(k, want[k], have[k]) for k in keys),
            "export": {k: list(have[k]) if isinstance(have[k], tuple) else have[k] for k in keys},
            **stats, "max_pixel_diff": float((ours - theirs).abs().max())}


def load_open_clip_folder(path: str | Path):
    """An open_clip export of this library as a Student, reading ``timm/`` and ``text/`` beside the
    config (not the absolute paths inside it): a moved export loads, and exporting it again to
    open_clip rewrites those paths."""
    from ..io import load_tensors, read_json
    from ..students import Student, TextTower
    from ..students.open_clip import openclip_text_tower
    from ..students.text import auto_model
    from ..transforms import PreprocessCfg
    from .timm import tower_from_timm_model

    timm, transformers = require("timm", "open_clip folders"), require("transformers", "open_clip folders")
    path = Path(path)
    cfg = read_json(path / CONFIG)
    model_cfg, pc = cfg["model_cfg"], cfg.get("preprocess_cfg", {})
    vision, text_cfg, dim = model_cfg["vision_cfg"], model_cfg["text_cfg"], int(model_cfg["embed_dim"])
    if "timm_model_name" not in vision or vision.get("timm_proj"):
        raise ExportError(f"{path / CONFIG}: not a clip-distill export (its image tower is not a timm trunk whose "
                          "classifier is the projection)")
    state = load_tensors(path / WEIGHTS)
    size = pc.get("size", 224)
    pre = PreprocessCfg(int(size[-1] if isinstance(size, (list, tuple)) else size), tuple(pc["mean"]),
                        tuple(pc["std"]), pc.get("interpolation", "bicubic"), pc.get("resize_mode", "shortest"))
    name, kwargs = vision["timm_model_name"], {}
    if name.startswith("local-dir:"):
        timm_cfg = read_json(path / "timm" / "config.json")
        name, kwargs = timm_cfg["architecture"], dict(timm_cfg.get("model_args") or {})
    trunk = timm.create_model(name, pretrained=False, **{**kwargs, "num_classes": dim, "global_pool": vision["timm_pool"]})
    trunk.load_state_dict({k[13:]: v for k, v in state.items() if k.startswith("visual.trunk.")}, strict=True)
    image = tower_from_timm_model(trunk, pre, name, kwargs)
    if text_cfg.get("hf_model_name"):
        encoder = auto_model(transformers.AutoModel.from_config, transformers.AutoConfig.from_pretrained(path / "text"))
        encoder.load_state_dict({k[17:]: v for k, v in state.items() if k.startswith("text.transformer.")}, strict=True)
        pooling = {v: k for k, v in _POOLERS.items()}[text_cfg["hf_pooler_type"]]
        spec = {"arch": f"open_clip:{path.name}", "pooling": pooling,
                "context_length": int(text_cfg["context_length"]), "proj_bias": False}
        text = TextTower(encoder, transformers.AutoTokenizer.from_pretrained(str(path)), dim, spec)
        text.proj.weight.data.copy_(state["text.proj.weight"])
    else:
        spec = {"arch": f"open_clip:{path.name}", "openclip": path.name,
                "model_cfg": {k: v for k, v in model_cfg.items() if k != "vision_cfg"},
                "logit_scale": float(state["logit_scale"].reshape(-1)[0])}
        text = openclip_text_tower(spec, require("open_clip", "open_clip folders").get_tokenizer(f"local-dir:{path}"))
        prefix = "text." if any(k.startswith("text.") for k in state) else ""
        text.encoder.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)
                                      and not k.startswith(("visual.", "logit_"))}, strict=True)
    return Student(image, text, dim)


def write(student: Any, folder: Path, data: Any = None, **_: Any) -> dict[str, Any]:
    """Write the open_clip layout, load it with open_clip alone and compare embeddings and preprocessing."""
    export_open_clip(student, folder)
    images, texts, rows = calibration_inputs(student, data, stand_ins=8)
    pixels = torch.from_numpy(images)
    got = open_clip_parity(folder, pixels, texts)
    with torch.no_grad():
        result = {"image": agreement(student.encode_image(pixels).numpy(), got["image"].numpy()),
                  "text": agreement(student.encode_text(list(texts)).numpy(), got["text"].numpy())}
    result["preprocess"] = preprocess_check(student, got, parity_images(student, rows, stand_ins=8))
    return result


register_format(Format("open_clip", write, gate=(0.9999, 0.9995),
                       detect=lambda folder: (folder / CONFIG).is_file(), read=load_open_clip_folder,
                       relocate=relocate, usage=USAGE))
