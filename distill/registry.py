"""Name-keyed registries with small entrypoints, as timm and open_clip do."""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import UnknownNameError


@dataclass
class Entry:
    name: str
    fn: Callable[..., Any]
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Maps names to entrypoint functions plus metadata (used by the YAML cards)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, fn: Callable | None = None, *, name: str | None = None, **meta: Any):
        """Decorator: ``@REG.register`` or ``@REG.register(name="x", image_size=224)``."""

        def wrap(f: Callable) -> Callable:
            key = name or f.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = Entry(key, f, dict(meta))
            return f

        return wrap(fn) if fn is not None else wrap

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise UnknownNameError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(self.list())}")
        return self._entries[name]

    def register_lazy(self, name: str, target: str, **meta: Any) -> None:
        """Register ``"module:attr"`` by name without importing it (the registry stays light: names can be
        listed and checked without the heavy module); it is imported when first created."""

        def load(**kwargs: Any) -> Any:
            import importlib

            module, attr = target.split(":")
            return getattr(importlib.import_module(module), attr)(**kwargs)

        self.register(load, name=name, **meta)

    def create(self, name: str, **kwargs: Any) -> Any:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.get(name).fn(**kwargs)

    def list(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def meta(self, name: str) -> dict[str, Any]:
        return dict(self.get(name).meta)
