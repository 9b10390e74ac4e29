"""The library's own layout (``safetensors``): ``model.safetensors`` + ``config.json`` (+ ``text/``), as
``Student.save`` writes it, optionally with fewer towers or in half precision. Nothing to compare: the
weights are the student's own."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import ExportError
from ..io import json_object
from ..students import read_student
from ..students.base import FORMAT
from .registry import Format, register_format

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def write(student: Any, folder: Path, towers: Sequence[str] = ("image", "text"), dtype: str = "fp32",
          **_: Any) -> dict[str, Any]:
    """The student's own files for ``towers``, with its floating-point weights in ``dtype``."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r}: use one of {list(DTYPES)}")
    kept = copy.copy(student)  # a shallow copy: towers left out are dropped from it, not from the student
    for tower in ("image", "text"):
        if tower not in towers:
            kept._modules[tower] = None
    kept.write(folder, dtype=DTYPES[dtype])
    return {}


def _is_saved_student(folder: Path) -> bool:
    return str(json_object(folder / "config.json").get("format", "")).startswith(FORMAT.split("/")[0])


register_format(Format("safetensors", write, detect=_is_saved_student, read=read_student, towers=True,
                       usage='from distill import load_student\nmodel = load_student("{path}")'))
