"""Old import paths of names that moved, kept for one release with a DeprecationWarning. The new module is
imported when an old name is first used (by name, so the old place does not depend on the new one)."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def forward(old: str, new: str, names: dict[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that finds its names in ``new`` (``names``: old -> new name where
    they differ, and the only names forwarded when given)."""

    def __getattr__(name: str) -> Any:
        if names is not None and name not in names:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        target = (names or {}).get(name, name)
        warnings.warn(f"{old}.{name} moved to {new}.{target}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), target)

    return __getattr__
