"""Names a package exports but imports only when first used, so that importing the package (or a light
module inside it) does not import torch."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy(package: str, names: dict[str, str], then: Callable[[str], Any] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``names`` maps a name to the submodule (relative, as
    ``.dataset``) that defines it; ``then`` answers the other names (e.g. a deprecation forward)."""

    def __getattr__(name: str) -> Any:
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            setattr(importlib.import_module(package), name, value)
            return value
        if then is not None:
            return then(name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
