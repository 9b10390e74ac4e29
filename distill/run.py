"""What a run records about itself beside its output: the rows it leaves out (``SkipLog``)."""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .data.rows import Rows

log = logging.getLogger(__name__)


class SkipLog:
    """Rows a run leaves out: one warning per row (however often it comes round), one line each in
    ``skipped.jsonl`` beside the run (appended as they come: nothing is lost on a crash), and a summary."""

    def __init__(self, path: str | os.PathLike | None = None, write: bool = True, resume: bool = False):
        self.path = Path(path) if path is not None else None
        self.write = write and self.path is not None
        self.seen: set[str] = set()
        self.reasons: dict[str, int] = {}
        if self.path is not None and self.path.exists():
            if resume:  # rows reported before the restart are not reported again
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self._count(rec.get("where", ""), rec.get("reason", ""))
            elif self.write:
                self.path.unlink()

    def _count(self, where: str, reason: str) -> None:
        self.seen.add(where)
        key = reason.split(" (")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def add(self, rows: Rows, i: int, reason: str) -> None:
        where = rows.where(i)
        if where in self.seen:
            return
        self._count(where, reason)
        log.warning("skipping %s: %s (%s)", where, reason, rows.images[i] or repr(rows.captions[i]))
        if self.write:
            rec = {"where": where, "image": rows.images[i], "caption": rows.captions[i], "reason": reason}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def add_all(self, rows: Rows, skipped: dict[int, str]) -> None:
        for i, reason in skipped.items():
            self.add(rows, i, reason)

    @property
    def count(self) -> int:
        return len(self.seen)

    def summary(self) -> str:
        if not self.seen:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        where = f" (listed in {self.path})" if self.path is not None and self.write else ""
        return f"{len(self.seen)} rows skipped: {parts}{where}"
