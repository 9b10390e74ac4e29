"""What embeds photos and queries for an index: an ONNX export through onnxruntime alone (no torch is imported),
or any folder ``load_student`` reads (a saved student or teacher, a run, an open_clip / timm /
sentence-transformers export) through PyTorch. Both give L2-normalised float32 numpy rows."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import ModelError

NO_TEXT = ("it has no text tower: to search by text, export the image student with --pair-teacher TEACHER (its "
           "teacher's text tower, which embeds into the same space) and use that export")


class Encoder:
    """``encode_images(PIL images)`` / ``encode_texts(strings)`` -> [N, D] unit rows; ``weights_ids``: a digest
    per tower of the PyTorch weights it was made from (an INT8 export records its source's)."""

    path: Path
    embed_dim: int
    weights_ids: dict[str, str | None]
    has_image: bool
    has_text: bool

    @property
    def name(self) -> str:
        return self.path.name

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "kind": type(self).__name__, "embed_dim": self.embed_dim,
                "weights_ids": self.weights_ids}

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def unknown_share(self, text: str) -> float:
        """The share of ``text``'s tokens the text tower's vocabulary does not know (0 when it has no UNK)."""
        return 0.0

    def _need(self, tower: str) -> None:
        if not (self.has_image if tower == "image" else self.has_text):
            raise ModelError(f"{self.path}: {NO_TEXT}" if tower == "text" else f"{self.path}: it has no image tower: "
                             "index photos with a model that has one")


class OnnxEncoder(Encoder):
    """An ONNX export (``distill export --format onnx|onnx-fp16|onnx-int8``), run by onnxruntime."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        from ..runtime import OnnxStudent

        self.path = Path(path)
        self.model = OnnxStudent(self.path, threads=threads)
        self.embed_dim = self.model.embed_dim
        self.has_image, self.has_text = self.model._image is not None, self.model._text is not None
        self.weights_ids = dict(self.model.config.get("weights_ids") or {})

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        self._need("image")
        return self.model.encode_image(list(images))

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        self._need("text")
        return self.model.encode_text(list(texts))

    def unknown_share(self, text: str) -> float:
        tok = self.model._tokenizer
        if tok is None:
            return 0.0
        unk = tok.token_to_id(getattr(tok.model, "unk_token", None) or "[UNK]")
        enc = tok.encode(text)
        ids = [i for i, special in zip(enc.ids, enc.special_tokens_mask) if not special]
        return sum(i == unk for i in ids) / len(ids) if ids and unk is not None else 0.0


class TorchEncoder(Encoder):
    """Any folder ``load_student`` reads, run by PyTorch."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu"):
        from ..interop import load_student

        self.path = Path(path)
        self.device = device
        self.model = load_student(self.path, device=device)
        self.embed_dim = self.model.embed_dim
        self.has_image, self.has_text = self.model.has_image, self.model.has_text
        self.weights_ids = {t: self.model.weights_id(t) for t in ("image", "text") if getattr(self.model, t) is not None}

    def encode_images(self, images: Sequence[Any]) -> np.ndarray:
        import torch

        self._need("image")
        transform = self.model.image_transform
        with torch.no_grad():
            pixels = torch.stack([transform(im) for im in images]).to(self.device)
            return self.model.encode_image(pixels).float().cpu().numpy()

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        import torch

        self._need("text")
        with torch.no_grad():
            return self.model.encode_text(list(texts)).float().cpu().numpy()

    def unknown_share(self, text: str) -> float:
        tok = self.model.tokenizer
        unk = getattr(tok, "unk_token_id", None)
        if tok is None or unk is None:
            return 0.0
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return sum(i == unk for i in ids) / len(ids) if ids else 0.0


def open_encoder(path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Encoder:
    """The encoder for a model folder: onnxruntime for an ONNX export (torch is not imported), PyTorch for
    anything else ``load_student`` reads (a run folder: its student)."""
    from ..outputs import model_folder

    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise ModelError(f"{path}: no such model folder (a saved student, a run or an export)")
    if (path / "onnx_config.json").is_file():
        return OnnxEncoder(path, threads)
    return TorchEncoder(model_folder(path), device)


__all__ = ["Encoder", "OnnxEncoder", "TorchEncoder", "open_encoder", "NO_TEXT"]
