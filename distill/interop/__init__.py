"""Every layout a student is written in, as plug-ins (``FORMATS``): the library's own (``safetensors``),
ONNX (FP32/FP16/INT8) and other libraries' own folders: open_clip (``local-dir:``), sentence-transformers
and timm / transformers (TimmWrapper). Each format module writes its layout, loads it back with that
layout's own runtime for the parity gate (:func:`distill.export.export`), and says which folders it reads.

A new format is one module that calls ``register_format(Format(...))``, imported below.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import native, onnx, open_clip, sentence_transformers, timm  # noqa: F401  (register the formats)
from .registry import FORMATS, Format, get_format, register_format


def load_student(path: str | Path, device: Any = "cpu"):
    """Rebuild a student from a folder, without the trainer or any hub: what ``Student.save`` or ``distill
    export`` wrote (safetensors, open_clip, sentence-transformers, timm), whichever format reads it, or a run
    folder's trained model."""
    from ..outputs import model_folder
    from ..students import read_student

    folder = model_folder(path)
    for name in FORMATS.list():
        fmt = get_format(name)
        if fmt.read is not None and fmt.detect is not None and folder.is_dir() and fmt.detect(folder):
            return fmt.read(folder).to(device).eval()
    return read_student(folder, device)  # names what is missing or wrong in the folder


__all__ = ["FORMATS", "Format", "get_format", "register_format", "load_student"]
