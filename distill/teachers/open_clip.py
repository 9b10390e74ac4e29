"""open_clip teachers: ``load_teacher("openclip:ViT-B-32", pretrained="laion2b_s34b_b79k")``."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .._imports import require
from ..transforms import PreprocessCfg
from .base import Teacher, file_hash, state_hash


class OpenClipTeacher(Teacher):
    backend = "openclip"

    def __init__(self, model, tokenizer, name: str, preprocess: PreprocessCfg, context_length: int,
                 model_cfg: dict[str, Any] | None = None):
        embed_dim = model.text_projection.shape[-1] if hasattr(model, "text_projection") and model.text_projection is not None \
            else model.visual.output_dim
        super().__init__(name, embed_dim, preprocess, context_length)
        self.model = model
        self._tokenizer = tokenizer
        self.model_cfg = model_cfg  # open_clip's architecture config: rebuilds the towers offline (pairing, export)
        self.freeze()

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        return self._tokenizer(list(texts), context_length=self.context_length)

    def _image(self, pixels):
        return self.model.encode_image(pixels)

    def _text(self, tokens):
        if isinstance(tokens, dict):
            tokens = tokens["input_ids"]
        return self.model.encode_text(tokens)


def create_open_clip_model(arch: str, pretrained: str | None = None, model_cfg: dict[str, Any] | None = None,
                           **kwargs: Any):
    """(open_clip model, its PreprocessCfg). ``model_cfg`` registers a custom architecture config
    under ``arch`` first (tests use tiny ones)."""
    open_clip = require("open_clip", "open_clip models")
    if model_cfg is not None:
        from open_clip import factory

        factory._MODEL_CONFIGS[arch] = model_cfg  # open_clip keeps its configs in this dict
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001: open_clip reports unreadable weights with many types
        raise _weights_error(arch, pretrained, e) from None
    pc = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pc.get("size", model.visual.image_size)
    size = size[-1] if isinstance(size, (tuple, list)) else size
    pre = PreprocessCfg(
        image_size=int(size),
        mean=tuple(pc.get("mean", PreprocessCfg.mean)),
        std=tuple(pc.get("std", PreprocessCfg.std)),
        interpolation=pc.get("interpolation", "bicubic"),
        resize_mode="squash" if pc.get("resize_mode") == "squash" else "shortest",
    )
    return model, pre


def _weights_error(arch: str, pretrained: str | None, e: Exception) -> Exception:
    """One line for open_clip weights that cannot be had: a local file that is unsafe or of another model,
    a tag that is unknown or cannot be downloaded here. Anything else is re-raised as it is."""
    from ..errors import FileFormatError, ModelError, first_line

    if pretrained and os.path.isfile(pretrained):
        if type(e).__name__ == "UnpicklingError":
            why = "weights_only=True: it holds Python objects besides tensors, never unpickled: that could run code"
        else:
            why = f"{type(e).__name__}: {first_line(e, 160)}"
        return FileFormatError(f"{pretrained}: not weights of open_clip's {arch} that can be read safely ({why}); "
                               "save a plain state dict, or a safetensors file")
    if pretrained and isinstance(e, (OSError, RuntimeError, ValueError)):
        return ModelError(f"teacher.pretrained: {pretrained!r} weights of {arch} cannot be had here "
                          f"({first_line(e, 160)}); give a local weights file (teacher.pretrained=PATH)")
    return e


def load_open_clip(
    arch: str, pretrained: str | None = None, model_cfg: dict[str, Any] | None = None, **kwargs: Any
) -> OpenClipTeacher:
    """Build an open_clip model by architecture name with a pretrained tag or a local weights file."""
    open_clip = require("open_clip", "open_clip teachers")
    model, pre = create_open_clip_model(arch, pretrained, model_cfg, **kwargs)
    tokenizer = open_clip.get_tokenizer(arch)
    ctx = getattr(tokenizer, "context_length", None) or getattr(model, "context_length", 77)
    teacher = OpenClipTeacher(model, tokenizer, arch, pre, int(ctx), open_clip.get_model_config(arch))
    if pretrained and os.path.isfile(pretrained):
        teacher.weights_id = file_hash(pretrained)
    elif pretrained:
        teacher.weights_id = f"tag:{pretrained}"
    else:
        teacher.weights_id = state_hash(model)
    return teacher
