"""open_clip teachers: ``load_teacher("openclip:ViT-B-32", pretrained="laion2b_s34b_b79k")``."""
from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from .._imports import require
from ..students.open_clip import create_open_clip_model
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

    def image_module(self):
        return self.model.visual

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
