"""Run an exported student with onnxruntime, numpy, pillow and ``tokenizers`` only (no torch).

    >>> from distill.runtime import OnnxStudent
    >>> m = OnnxStudent("export/vit_tiny_onnx")
    >>> img = m.encode_image(["cat.jpg"])            # [N, D] float32, L2-normalised
    >>> txt = m.encode_text(["a photo of a cat"])     # needs a text tower in the export
    >>> (img @ txt.T).argmax(-1)

The folder is what ``distill export --format onnx|onnx-fp16|onnx-int8`` writes: ``image.onnx``
and/or ``text.onnx``, ``onnx_config.json`` and, for a text tower, its ``tokenizer.json``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .errors import ModelError
from .io import read_format_json
from .transforms import PreprocessCfg, eval_array, to_rgb

ONNX_FORMAT = "clip-distill-onnx/1"
NO_TEXT = ("to encode text, export an image student again with --pair-teacher TEACHER (its teacher's text tower, "
           "which embeds into the same space)")


def _normalize(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxStudent:
    """An exported student: ``encode_image`` / ``encode_text`` like the PyTorch one, on numpy arrays.

    Args:
        path: the export folder.
        providers: onnxruntime execution providers (default: CPU).
        threads: intra-op threads (default: onnxruntime's choice).
    """

    def __init__(self, path: str | os.PathLike, providers: Sequence[str] | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.config: dict[str, Any] = read_format_json(self.path / "onnx_config.json", ONNX_FORMAT,
                                                       "not an ONNX export folder (run distill export --format onnx)")
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        providers = list(providers or ["CPUExecutionProvider"])
        self.embed_dim = int(self.config["embed_dim"])
        self.preprocess = PreprocessCfg.from_dict(self.config["image"]["preprocess"]) if "image" in self.config else None
        self._image = self._text = self._tokenizer = None
        if "image" in self.config:
            self._image = ort.InferenceSession(str(self.path / self.config["image"]["file"]), opts, providers=providers)
            self._pixel_type = np.float16 if "float16" in self._image.get_inputs()[0].type else np.float32
        if "text" in self.config:
            from tokenizers import Tokenizer

            t = self.config["text"]
            self._text = ort.InferenceSession(str(self.path / t["file"]), opts, providers=providers)
            tok = Tokenizer.from_file(str(self.path / t["tokenizer"]))
            tok.enable_truncation(max_length=int(t["context_length"]))
            tok.enable_padding(pad_id=int(t["pad_id"]), pad_token=t["pad_token"])
            self._tokenizer = tok

    @property
    def modality(self) -> str:
        return "both" if self._image and self._text else ("image" if self._image else "text")

    def preprocess_images(self, images: Sequence[Any]) -> np.ndarray:
        """Paths or PIL images -> [N, 3, S, S] float32 with the student's eval preprocessing."""
        from PIL import Image

        out = []
        for im in images:
            if not hasattr(im, "convert"):
                with Image.open(im) as f:
                    f.load()
                    im = to_rgb(f)
            else:
                im = to_rgb(im)
            out.append(eval_array(im, self.preprocess))
        return np.stack(out)

    def encode_image(self, images: Sequence[Any] | np.ndarray, batch_size: int = 32) -> np.ndarray:
        """L2-normalised embeddings of image paths, PIL images or preprocessed [N, 3, S, S] pixels."""
        if self._image is None:
            raise ModelError(f"{self.path}: this export has no image tower")
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            pixels = chunk if isinstance(chunk, np.ndarray) else self.preprocess_images(chunk)
            out.append(self._image.run(None, {"pixels": pixels.astype(self._pixel_type)})[0])
        return _normalize(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            raise ModelError(f"{self.path}: this export has no text tower; {NO_TEXT}")
        enc = self._tokenizer.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}

    def encode_text(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """L2-normalised embeddings of a list of strings."""
        if self._text is None:
            raise ModelError(f"{self.path}: this export has no text tower; {NO_TEXT}")
        out = [self._text.run(None, self.tokenize(texts[i:i + batch_size]))[0] for i in range(0, len(texts), batch_size)]
        return _normalize(np.concatenate(out)) if out else np.zeros((0, self.embed_dim), np.float32)
