"""Hugging Face CLIP / SigLIP teachers: ``load_teacher("hf:openai/clip-vit-base-patch32")``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from .._imports import require
from ..transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PreprocessCfg
from .base import Teacher, file_hash, state_hash

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")


def _features(out: Any) -> torch.Tensor:
    # transformers 4 returns a tensor, 5 a BaseModelOutputWithPooling holding the projection
    return out if torch.is_tensor(out) else out.pooler_output


class ClipBpeTokenizer:
    """open_clip's CLIP BPE tokenizer (same vocabulary as OpenAI CLIP) for dirs without tokenizer files."""

    def __init__(self, context_length: int = 77):
        open_clip = require("open_clip", "the CLIP BPE tokenizer fallback")
        self._tok = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        self.context_length = context_length

    def __call__(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self._tok(list(texts), context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}


class HFClipTeacher(Teacher):
    backend = "hf"

    def __init__(self, model, tokenizer, name: str, preprocess: PreprocessCfg, context_length: int, pad_max: bool):
        super().__init__(name, model.config.projection_dim if hasattr(model.config, "projection_dim")
                         else model.config.text_config.hidden_size, preprocess, context_length)
        self.model = model
        self._tokenizer = tokenizer
        self._pad_max = pad_max  # SigLIP was trained with max_length padding
        self.freeze()

    def image_module(self):
        return torch.nn.ModuleList([m for m in (getattr(self.model, "vision_model", None),
                                                getattr(self.model, "visual_projection", None)) if m is not None])

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(self._tokenizer, ClipBpeTokenizer):
            return self._tokenizer(texts)
        out = self._tokenizer(
            list(texts), padding="max_length" if self._pad_max else True, truncation=True,
            max_length=self.context_length, return_tensors="pt",
        )
        return {k: out[k] for k in ("input_ids", "attention_mask") if k in out}

    def _image(self, pixels):
        return _features(self.model.get_image_features(pixel_values=pixels))

    def _text(self, tokens):
        if torch.is_tensor(tokens):
            tokens = {"input_ids": tokens}
        if self._pad_max:
            tokens = {"input_ids": tokens["input_ids"]}  # SigLIP ignores the mask by design
        return _features(self.model.get_text_features(**tokens))


def _preprocess_from_dir(path: Path, model) -> PreprocessCfg:
    siglip = "siglip" in model.config.model_type
    vision = model.config.vision_config
    default = PreprocessCfg(
        image_size=int(vision.image_size),
        mean=(0.5, 0.5, 0.5) if siglip else OPENAI_CLIP_MEAN,
        std=(0.5, 0.5, 0.5) if siglip else OPENAI_CLIP_STD,
        resize_mode="squash" if siglip else "shortest",
    )
    file = path / "preprocessor_config.json"
    if not file.exists():
        return default
    cfg = json.loads(file.read_text())
    size = cfg.get("crop_size") or cfg.get("size") or {}
    if isinstance(size, dict):
        size = size.get("height") or size.get("shortest_edge") or default.image_size
    squash = not cfg.get("do_center_crop", not siglip)
    return PreprocessCfg(
        image_size=int(size),
        mean=tuple(cfg.get("image_mean", default.mean)),
        std=tuple(cfg.get("image_std", default.std)),
        interpolation="bilinear" if cfg.get("resample") == 2 else "bicubic",
        resize_mode="squash" if squash else "shortest",
    )


def load_hf_clip(model_id: str, **kwargs: Any) -> HFClipTeacher:
    """CLIPModel or SiglipModel from a hub id or a local folder."""
    from ..errors import unreachable

    transformers = require("transformers", "Hugging Face teachers")
    try:
        model = transformers.AutoModel.from_pretrained(model_id, **kwargs)
    except OSError as e:  # not a local folder, and the hub cannot be reached (or has no such model)
        raise unreachable(e, f"the CLIP model {model_id!r}", "teacher.name",
                          "give a local folder holding it (hf:<folder>)") from None
    if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
        from ..errors import ModelError

        raise ModelError(f"{model_id}: {type(model).__name__} is not a CLIP/SigLIP model")
    local = Path(model_id) if os.path.isdir(model_id) else None
    siglip = "siglip" in model.config.model_type
    ctx = int(model.config.text_config.max_position_embeddings)
    if local is not None and not any((local / f).exists() for f in _TOKENIZER_FILES):
        if siglip:
            from ..errors import MissingFileError

            raise MissingFileError(f"{model_id}: no tokenizer files, and SigLIP has no bundled fallback")
        tokenizer = ClipBpeTokenizer(ctx)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
    pre = _preprocess_from_dir(local, model) if local is not None else _preprocess_from_hub(model_id, model)
    teacher = HFClipTeacher(model, tokenizer, model_id, pre, ctx, pad_max=siglip)
    weights = next((local / f for f in ("model.safetensors", "pytorch_model.bin") if (local / f).exists()), None) \
        if local is not None else None
    teacher.weights_id = file_hash(weights) if weights is not None else (
        f"hub:{model_id}@{getattr(model.config, '_commit_hash', None) or 'main'}" if local is None else state_hash(model))
    return teacher


def _preprocess_from_hub(model_id: str, model) -> PreprocessCfg:
    try:
        from huggingface_hub import hf_hub_download

        return _preprocess_from_dir(Path(hf_hub_download(model_id, "preprocessor_config.json")).parent, model)
    except Exception:  # no preprocessor file on the hub entry: use the family defaults
        return _preprocess_from_dir(Path("/nonexistent"), model)
