"""Data sources as plug-ins: each reader registers what source strings it reads and how."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ...registry import Registry
from ..rows import Rows


@dataclass(frozen=True)
class Source:
    """``match(source)``: this reader reads the source string (a path, a glob, a prefixed name);
    ``read(source, image_column, caption_column) -> Rows``."""

    name: str
    match: Callable[[str], bool]
    read: Callable[[str, str | None, str | None], Rows]


SOURCES = Registry("data source")


def register_source(source: Source) -> Source:
    SOURCES.register(lambda: source, name=source.name)
    return source


__all__ = ["Source", "SOURCES", "register_source"]
