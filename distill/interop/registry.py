"""Export formats as plug-ins: each format module registers one ``Format`` (how to write a student in that
layout and check it through its own runtime, how to recognise and read such a folder back)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..registry import Registry


@dataclass(frozen=True)
class Format:
    """``write(student, folder, data=..., towers=..., **options) -> parity result`` writes the layout into
    ``folder`` and compares it, loaded by its own runtime, with the student (``{}`` when nothing is
    checked). ``gate``: (minimum mean, minimum 1st-percentile cosine) per tower, or None (no check).
    ``detect(folder)`` / ``read(folder) -> Student``: folders of this layout that ``load_student`` reads.
    ``relocate(folder, where)``: rewrite what the layout records of its own place before it is moved there.
    ``towers``: the format writes a chosen subset of towers (``--towers``)."""

    name: str
    write: Callable[..., dict[str, Any]]
    gate: tuple[float, float] | None = None
    detect: Callable[[Path], bool] | None = None
    read: Callable[[Path], Any] | None = None
    relocate: Callable[[Path, Path], None] | None = None
    towers: bool = False
    hint: str = ""  # what to try when the gate fails
    usage: str = ""  # Python that loads such a folder (``{path}``), for its model card


FORMATS = Registry("export format")


def register_format(fmt: Format) -> Format:
    FORMATS.register(lambda: fmt, name=fmt.name)
    return fmt


def get_format(name: str) -> Format:
    return FORMATS.create(name)


__all__ = ["Format", "FORMATS", "register_format", "get_format"]
