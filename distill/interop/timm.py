"""timm layout of an image tower: the projection head becomes the timm model's own classifier
(``num_classes = embed_dim``), so ``timm.create_model("local-dir:OUT", pretrained=True)`` and
``transformers.AutoModelForImageClassification.from_pretrained(OUT)`` (TimmWrapper) both return the
student's image embedding, before normalisation, as their logits. ``model_args`` in ``config.json``
carries non-default ``model_kwargs`` (image size, patch size, depth); ``pretrained_cfg`` carries
the student's preprocessing. ``load_student(OUT)`` reads the folder back.
"""
from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._imports import require
from ..errors import ExportError
from ..io import json_object, read_json, save_tensors, write_json
from ..transforms import PreprocessCfg
from .parity import agreement, calibration_inputs
from .registry import Format, register_format

# our resize modes as timm's crop modes: "shortest" = resize the short side, centre-crop (crop_pct 1)
_CROP_MODE = {"shortest": "center", "squash": "squash"}


def timm_model(tower: Any) -> nn.Module:
    """A timm model (eval mode) equal to ``tower``: its trunk's weights, the projection as classifier."""
    timm = require("timm", "timm exports")
    spec = tower.spec
    if "timm_name" not in spec:
        raise ExportError(f"image tower {spec.get('arch')!r} is not a timm model; only timm towers have a timm layout")
    model = timm.create_model(spec["timm_name"], pretrained=False, num_classes=tower.proj.out_features,
                              **(spec.get("model_kwargs") or {}))
    missing, unexpected = model.load_state_dict(tower.trunk.state_dict(), strict=False)
    head = model.get_classifier()
    head_keys = {n for n, p in model.named_parameters() if any(p is q for q in head.parameters())}
    if unexpected or set(missing) != head_keys or not isinstance(head, nn.Linear) \
            or head.weight.shape != tower.proj.weight.shape or (head.bias is None) != (tower.proj.bias is None):
        raise ExportError(f"{spec['timm_name']}: its classifier is not a plain linear layer over the pooled features "
                          f"(missing {sorted(set(missing) - head_keys)}, unexpected {unexpected}); no exact timm layout")
    with torch.no_grad():
        head.weight.copy_(tower.proj.weight)
        if head.bias is not None:
            head.bias.copy_(tower.proj.bias)
    return model.eval()


def pretrained_cfg(model: nn.Module, pre: PreprocessCfg) -> dict[str, Any]:
    """timm's pretrained_cfg describing the student's eval preprocessing (not ImageNet weights)."""
    cfg = {k: v for k, v in dict(model.pretrained_cfg).items() if k not in ("url", "hf_hub_id", "tag", "license",
                                                                            "file", "source", "state_dict")}
    cfg.update(input_size=(3, pre.image_size, pre.image_size), mean=tuple(pre.mean), std=tuple(pre.std),
               interpolation=pre.interpolation, crop_pct=1.0, crop_mode=_CROP_MODE[pre.resize_mode])
    return cfg


def timm_config(model: nn.Module, tower: Any) -> dict[str, Any]:
    """timm's own ``config.json`` for ``model`` (``architecture``, ``model_args``, ``pretrained_cfg``)."""
    from timm.models._hub import save_config_for_hf

    model = copy.copy(model)  # shallow: only pretrained_cfg is replaced
    model.pretrained_cfg = pretrained_cfg(model, tower.preprocess)
    with tempfile.TemporaryDirectory() as tmp:
        save_config_for_hf(model, str(Path(tmp) / "config.json"), model_args=dict(tower.spec.get("model_kwargs") or {}))
        cfg = read_json(Path(tmp) / "config.json")
    # num_classes stays at the root only: TimmWrapper passes it besides model_args (a duplicate is a TypeError)
    cfg.get("model_args", {}).pop("num_classes", None)
    return cfg


def export_timm(student: Any, out: Path) -> None:
    """Write ``config.json`` + ``model.safetensors`` (timm's layout) for the student's image tower."""
    if student.image is None:
        raise ExportError("the timm format needs an image tower; this student has only a text tower "
                          "(use --format sentence-transformers)")
    model = timm_model(student.image)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    write_json(out / "config.json", timm_config(model, student.image))


def tower_from_timm_model(model: nn.Module, pre: PreprocessCfg, timm_name: str, kwargs: dict[str, Any]):
    """An ImageTower from a timm model whose linear classifier is the projection (the model becomes the trunk)."""
    from ..students import ImageTower

    head = model.get_classifier()
    if not isinstance(head, nn.Linear):
        raise ExportError(f"{timm_name} has no linear classifier to use as projection head")
    kwargs = {k: v for k, v in kwargs.items() if k != "num_classes"}
    tower = ImageTower(model, head.out_features, pre, {"arch": f"timm:{timm_name}", "timm_name": timm_name,
                                                       "model_kwargs": kwargs})
    with torch.no_grad():
        tower.proj.weight.copy_(head.weight)
        tower.proj.bias.copy_(head.bias)
    model.reset_classifier(0)  # the trunk now returns pooled features, as an ImageTower's does
    return tower


def load_timm_folder(path: str | Path):
    """A timm-layout folder (config.json with ``architecture``) as a one-tower image Student."""
    from ..students import Student

    timm = require("timm", "timm folders")
    path = Path(path)
    cfg = read_json(path / "config.json")
    pc = cfg.get("pretrained_cfg", {})
    modes = {v: k for k, v in _CROP_MODE.items()}
    pre = PreprocessCfg(int(pc.get("input_size", (3, 224, 224))[-1]), tuple(pc.get("mean", PreprocessCfg.mean)),
                        tuple(pc.get("std", PreprocessCfg.std)), pc.get("interpolation", "bicubic"),
                        modes.get(pc.get("crop_mode", "center"), "shortest"))
    model = timm.create_model(f"local-dir:{path}", pretrained=True)
    tower = tower_from_timm_model(model, pre, cfg["architecture"], dict(cfg.get("model_args") or {}))
    return Student(tower, None, tower.proj.out_features)


@torch.no_grad()
def timm_parity(student: Any, out: Path, pixels: torch.Tensor) -> dict[str, Any]:
    """Unnormalised image embeddings from timm's and transformers' loaders vs the student's."""
    transformers = require("transformers", "the TimmWrapper check")
    ref = student.image_features(pixels)
    got = {"timm": require("timm", "timm exports").create_model(f"local-dir:{out}", pretrained=True).eval()(pixels)}
    wrapper = transformers.AutoModelForImageClassification.from_pretrained(str(out)).eval()
    got["transformers"] = wrapper(pixel_values=pixels).logits
    return {name: (ref, emb) for name, emb in got.items()}


def write(student: Any, folder: Path, data: Any = None, **_: Any) -> dict[str, Any]:
    """Write the image tower in timm's layout, load it with timm and with transformers, and compare."""
    export_timm(student, folder)
    images, _, _ = calibration_inputs(student, data, stand_ins=8)
    result = {}
    for runtime, (ref, got) in timm_parity(student, folder, torch.from_numpy(images)).items():
        result["image" if runtime == "timm" else f"image ({runtime})"] = agreement(ref.numpy(), got.numpy())
    return result


def _is_timm_folder(folder: Path) -> bool:
    return not (folder / "modules.json").exists() and "architecture" in json_object(folder / "config.json")


register_format(Format("timm", write, gate=(0.9999, 0.9995), detect=_is_timm_folder, read=load_timm_folder,
                       usage='import timm\nmodel = timm.create_model("local-dir:{path}", pretrained=True)'))
