"""clip-distill: distil a large frozen CLIP teacher into tiny, fast CLIP students.

Public API (imported lazily, so ``import distill`` stays light)::

    from distill import load_teacher, create_student, load_student, Distiller
"""
from __future__ import annotations

import importlib
from typing import Any

from .version import __version__

_LAZY = {
    "load_teacher": "distill.teachers",
    "list_teachers": "distill.teachers",
    "create_student": "distill.students",
    "load_student": "distill.interop",
    "list_students": "distill.students",
    "register_student": "distill.students",
    "Distiller": "distill.trainer",
    "FitResult": "distill.trainer",
    "Tuner": "distill.tune",
    "train_step": "distill.loop",
    "TrainLoop": "distill.loop",
    "build_pipeline": "distill.pipeline",
    "export": "distill.export",
    "Recipe": "distill.config",
    "load_recipe": "distill.config",
    "RecipeError": "distill.config",
    "load_rows": "distill.data",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'distill' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
