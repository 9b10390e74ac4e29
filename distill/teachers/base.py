"""The frozen teacher interface shared by every backend."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io import file_digest
from ..transforms import PreprocessCfg, eval_transform


class Teacher(nn.Module):
    """A frozen CLIP-style teacher: always in eval mode, never tracks gradients.

    Subclasses set ``embed_dim``, ``preprocess`` (None for text-only teachers),
    ``context_length`` and implement ``_image`` / ``_text`` / ``tokenize``.
    """

    backend: str = "base"

    def __init__(self, name: str, embed_dim: int, preprocess: PreprocessCfg | None, context_length: int):
        super().__init__()
        self.name = name
        self.embed_dim = int(embed_dim)
        self.preprocess = preprocess
        self.context_length = int(context_length)
        self.weights_id = "unknown"  # tag, file hash or state hash, set by the loader

    def freeze(self) -> "Teacher":
        for p in self.parameters():
            p.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # a teacher never leaves eval mode (dropout, norm statistics)

    @property
    def device(self) -> torch.device:
        p = next(self.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    @property
    def has_image(self) -> bool:
        return self.preprocess is not None

    @property
    def has_text(self) -> bool:
        return True

    def num_params(self, tower: str | None = None) -> int:
        """Parameters of the whole teacher, or of its ``image`` / ``text`` tower (``image_module`` is the image
        tower; the text tower is the rest)."""
        total = sum(p.numel() for p in self.parameters())
        if tower is None:
            return total
        image = self.image_module()
        n_image = sum(p.numel() for p in image.parameters()) if image is not None else 0
        return n_image if tower == "image" else total - n_image

    def image_module(self) -> nn.Module | None:
        """The module that is the image tower (backends override; None: no image tower)."""
        return None

    @property
    def image_transform(self):
        """PIL image -> tensor with the teacher's own eval preprocessing."""
        if self.preprocess is None:
            from ..errors import ModelError

            raise ModelError(f"teacher {self.name} has no image tower")
        return eval_transform(self.preprocess)

    @property
    def identity(self) -> dict[str, Any]:
        """What makes this teacher's embeddings what they are; the cache fingerprint."""
        p = self.preprocess
        return {
            "backend": self.backend,
            "name": self.name,
            "weights": self.weights_id,
            "embed_dim": self.embed_dim,
            "image_size": p.image_size if p else None,
            "mean": list(p.mean) if p else None,
            "std": list(p.std) if p else None,
            "interpolation": p.interpolation if p else None,
            "resize_mode": p.resize_mode if p else None,
            "context_length": self.context_length,
        }

    # -- encoding -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Any:
        raise NotImplementedError

    def _image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _text(self, tokens: Any) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings, [B, embed_dim]."""
        return F.normalize(self._image(pixels.to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Any) -> torch.Tensor:
        """L2-normalised text embeddings for a list of strings or already tokenized input."""
        if isinstance(texts, (list, tuple)) and (not texts or isinstance(texts[0], str)):
            texts = self.tokenize(list(texts))
        if isinstance(texts, torch.Tensor):
            texts = texts.to(self.device)
        elif isinstance(texts, dict):
            texts = {k: v.to(self.device) for k, v in texts.items()}
        return F.normalize(self._text(texts).float(), dim=-1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, embed_dim={self.embed_dim}"


def file_hash(path: str | Path, algo: str = "sha256") -> str:
    return f"{algo}:{file_digest(path, algo)[:16]}"


def state_hash(module: nn.Module) -> str:
    """Hash of a module's weights: distinguishes random inits and edited weights."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return f"state:{h.hexdigest()[:16]}"
