"""Old import paths of names that moved, kept for one release with a DeprecationWarning. The new module is
imported when an old name is first used (by name, so the old place does not depend on the new one)."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable


def forward(old: str, new: str | dict[str, str], names: dict[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old``. ``new``: the module every moved name now lives in (``names``: old
    -> new name, and the only names forwarded when given), or ``{old name: "module:name"}`` for names that
    went to several modules."""
    table = {k: (new, v) for k, v in (names or {}).items()} if isinstance(new, str) else \
        {k: tuple(v.split(":")) for k, v in new.items()}

    def __getattr__(name: str) -> Any:
        if name not in table:
            if isinstance(new, str) and names is None:
                table[name] = (new, name)
            else:
                raise AttributeError(f"module {old!r} has no attribute {name!r}")
        module, target = table[name]
        warnings.warn(f"{old}.{name} moved to {module}.{target}; the old path goes away in the next release",
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(module), target)

    return __getattr__
