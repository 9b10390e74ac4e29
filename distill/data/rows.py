"""Rows: flat image-caption pairs (one row per caption), wherever they were read from, and the rules a run
leaves rows out by before reading any image."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from .images import stat_problem


@dataclass
class Rows:
    """Flat image-caption pairs (one row per caption); ``labels``/``classes`` for class folders.

    ``lines``: where each row came from in ``source`` (1-based line of a text file), for messages;
    ``layout``: how the source was read (``distill data check`` reports it)."""

    images: list[str | None]
    captions: list[str | None]
    labels: list[int] | None = None
    classes: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    lines: list[int] | None = None
    layout: str = ""
    unit: str = "line"  # what ``lines`` count: "line" of a text file, or "item" of a JSON list
    teacher_texts: list[str | None] | None = None  # what the teacher reads for each row, when not its caption

    def teacher_text(self, i: int) -> str | None:
        return self.teacher_texts[i] if self.teacher_texts is not None else self.captions[i]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_images(self) -> bool:
        return any(i is not None for i in self.images)

    @property
    def has_text(self) -> bool:
        return any(c for c in self.captions)

    def no_text(self) -> str:
        """Why ``has_text`` is False, for a one-line error: an empty caption column, or none."""
        if self.captions and not self.has_text:
            return f"its caption column is empty in all {len(self.captions)} rows"
        return "it has no captions"

    def where(self, i: int) -> str:
        """``pairs.csv:58`` (or ``pairs.csv row 57``) for messages about row ``i``."""
        if self.lines is not None and self.lines[i]:
            return f"{self.source}:{self.lines[i]}" if self.unit == "line" else f"{self.source} item {self.lines[i]}"
        return f"{self.source or '<rows>'} row {i}"

    def subset(self, idx: Sequence[int]) -> "Rows":
        return Rows(
            [self.images[i] for i in idx], [self.captions[i] for i in idx],
            [self.labels[i] for i in idx] if self.labels is not None else None, self.classes, self.source,
            dict(self.extra), [self.lines[i] for i in idx] if self.lines is not None else None, self.layout,
            self.unit, [self.teacher_texts[i] for i in idx] if self.teacher_texts is not None else None,
        )


def split_usable(rows: Rows, need_image: bool, need_caption: bool) -> tuple[list[int], dict[int, str]]:
    """(rows a run can use, {row: why not} for the others), by the rules of ``distill data check`` that
    need no decoding: a missing or empty image file, no image where the run needs one, an empty
    caption in caption data. Problems that show only when decoding are skipped as rows are read."""
    skipped: dict[int, str] = {}
    problems: dict[str, str | None] = {}
    for i, (p, c) in enumerate(zip(rows.images, rows.captions)):
        if need_image and p is None:
            skipped[i] = "no image"
        elif need_caption and not (c or "").strip():
            skipped[i] = "empty caption"
        elif rows.teacher_texts is not None and not (rows.teacher_texts[i] or "").strip():
            skipped[i] = "empty source sentence"
        elif p is not None and need_image:
            if p not in problems:
                problems[p] = stat_problem(p)
            if problems[p]:
                skipped[i] = problems[p]
    return [i for i in range(len(rows)) if i not in skipped], skipped
