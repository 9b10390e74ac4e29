"""Optional dependencies, imported when used, with the pip command that installs them."""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from .errors import MissingDependencyError

_HINTS = {
    "open_clip": "pip install open_clip_torch",
    "transformers": "pip install transformers",
    "timm": "pip install timm",
    "accelerate": "pip install accelerate",
    "peft": "pip install peft",
    "onnxruntime": "pip install onnxruntime",
}


def is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def require(module: str, why: str = "") -> ModuleType:
    """Import ``module`` or raise ImportError that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        hint = _HINTS.get(module.split(".")[0], f"pip install {module}")
        reason = f" for {why}" if why else ""
        raise MissingDependencyError(f"{module} is needed{reason}: {hint}") from e
