"""sentence-transformers layout of a text tower: ``SentenceTransformer(OUT)`` gives the student's
text embeddings with the standard modules (Transformer -> Pooling -> Dense (the projection head,
identity activation) -> Normalize), and ``load_student(OUT)`` reads the same folder back.

The files follow the layout sentence-transformers 2-5 write (``modules.json`` with
``sentence_transformers.models.*`` types, ``pooling_mode_*_tokens`` flags); 6 reads it unchanged.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .._imports import require
from ..errors import ExportError, MissingFileError
from ..io import load_tensors, read_json, save_tensors, write_json
from .parity import agreement, calibration_inputs
from .registry import Format, register_format

IDENTITY = "torch.nn.modules.linear.Identity"
_FLAGS = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens"}
_MODULES = ("Transformer", "Pooling", "Dense", "Normalize")


def _module(idx: int, kind: str, path: str) -> dict[str, Any]:
    return {"idx": idx, "name": str(idx), "path": path, "type": f"sentence_transformers.models.{kind}"}


def export_sentence_transformers(student: Any, out: Path) -> None:
    """Write the student's text tower as a sentence-transformers folder."""
    from ..students import TextTower

    text = student.text
    if text is None:
        raise ExportError("the sentence-transformers format needs a text tower; this student has only an image tower "
                          "(use --format timm or open_clip)")
    if not isinstance(text, TextTower):
        raise ExportError(f"text tower {text.spec.get('arch')!r} is an open_clip tower; sentence-transformers holds "
                          "transformers encoders only (use --format open_clip)")
    from ..version import __version__

    out.mkdir(parents=True, exist_ok=True)
    text.encoder.save_pretrained(str(out))  # config.json (with model_type) + model.safetensors
    tokenizer = copy.deepcopy(text.tokenizer)
    tokenizer.model_max_length = text.context_length  # where sentence-transformers 6 reads the context length
    tokenizer.save_pretrained(str(out))
    hidden, dim = text.proj.in_features, text.proj.out_features
    write_json(out / "sentence_bert_config.json", {"max_seq_length": text.context_length, "do_lower_case": False})
    write_json(out / "1_Pooling" / "config.json",
               {"word_embedding_dimension": hidden, **{flag: mode == text.pooling for mode, flag in _FLAGS.items()},
                "pooling_mode_mean_sqrt_len_tokens": False})
    write_json(out / "2_Dense" / "config.json", {"in_features": hidden, "out_features": dim,
                                                 "bias": text.proj.bias is not None, "activation_function": IDENTITY})
    save_tensors(out / "2_Dense" / "model.safetensors", dict(text.proj.named_parameters(prefix="linear")))
    (out / "3_Normalize").mkdir(exist_ok=True)
    write_json(out / "modules.json", [_module(0, "Transformer", ""), _module(1, "Pooling", "1_Pooling"),
                                      _module(2, "Dense", "2_Dense"), _module(3, "Normalize", "3_Normalize")])
    write_json(out / "config_sentence_transformers.json",
               {"__version__": {"sentence_transformers": "5.0.0", "clip_distill": __version__},
                "prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"})


def _dense(folder: Path, hidden: int) -> tuple[dict[str, torch.Tensor], bool]:
    cfg = read_json(folder / "config.json")
    if cfg.get("activation_function", IDENTITY) != IDENTITY or int(cfg["in_features"]) != hidden:
        raise ExportError(f"{folder / 'config.json'}: only a linear Dense (activation {IDENTITY}) on the pooled "
                          f"{hidden}-d output can be a projection head")
    if not (folder / "model.safetensors").exists():
        raise MissingFileError(f"{folder}: no model.safetensors (pickled pytorch_model.bin weights are not read)")
    state = load_tensors(folder / "model.safetensors")
    return {k.split(".", 1)[1]: v for k, v in state.items()}, bool(cfg.get("bias", True))


def load_sentence_transformer(path: str | Path):
    """A sentence-transformers folder (Transformer, Pooling, optional Dense and Normalize) as a text Student."""
    from ..students import Student, TextTower
    from ..students.base import keep_space
    from ..students.text import auto_model, read_pooling, st_context_length

    transformers = require("transformers", "sentence-transformers folders")
    path = Path(path)
    modules = read_json(path / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or any(k not in _MODULES for k in kinds) or kinds.count("Dense") > 1:
        raise ExportError(f"{path / 'modules.json'}: modules {kinds} are not Transformer, Pooling[, Dense][, Normalize]")
    folder = path / (modules[0].get("path") or "")
    encoder = auto_model(transformers.AutoModel.from_pretrained, str(folder))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    hidden = int(encoder.config.hidden_size)
    head, bias = (None, False)
    if "Dense" in kinds:
        head, bias = _dense(path / modules[kinds.index("Dense")]["path"], hidden)
    dim = head["weight"].shape[0] if head else hidden
    spec = {"arch": f"sentence-transformers:{path.name}", "pooling": read_pooling(path),
            "context_length": st_context_length(folder, tokenizer) or 512, "proj_bias": bias}
    tower = TextTower(encoder, tokenizer, dim, spec)
    if head:
        tower.proj.load_state_dict(head, strict=True)
    else:
        keep_space(tower.proj)  # no Dense: the pooled output is the embedding
    return Student(None, tower, dim)


@torch.no_grad()
def sentence_transformers_parity(out: Path, texts: Sequence[str]) -> np.ndarray:
    """Embeddings of ``texts`` from ``SentenceTransformer(out)`` (normalised by its Normalize module)."""
    st = require("sentence_transformers", "the sentence-transformers check")
    model = st.SentenceTransformer(str(out), device="cpu")
    return np.asarray(model.encode(list(texts), convert_to_numpy=True), dtype=np.float32)


def write(student: Any, folder: Path, data: Any = None, **_: Any) -> dict[str, Any]:
    """Write the text tower as a sentence-transformers folder, load it with ``SentenceTransformer`` and compare."""
    export_sentence_transformers(student, folder)
    _, texts, _ = calibration_inputs(student, data, stand_ins=8)
    with torch.no_grad():
        ref = student.encode_text(list(texts)).numpy()
    return {"text": agreement(ref, sentence_transformers_parity(folder, texts))}


# float32 copies of the same weights: any layout error shows on every sample
register_format(Format("sentence-transformers", write, gate=(0.9999, 0.9995),
                       detect=lambda folder: (folder / "modules.json").is_file(), read=load_sentence_transformer,
                       usage='from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer("{path}")'))
