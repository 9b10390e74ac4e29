"""Progress of long work, fit for where it goes: a live bar on a terminal; in a log file or CI (stderr is
not a terminal) one plain line every ``every_s`` seconds or tenth of the work, and one at the end: never
carriage-return frames in a log. ``DISTILL_PROGRESS=bar`` or ``lines`` chooses one everywhere, ``off``
silences every progress report."""
from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TextIO

MODES = ("bar", "lines", "off")


def mode(stream: TextIO | None = None) -> str:
    """``bar`` on a terminal, ``lines`` elsewhere, unless ``DISTILL_PROGRESS`` says otherwise."""
    chosen = os.environ.get("DISTILL_PROGRESS", "").strip().lower()
    if chosen in MODES:
        return chosen
    stream = stream or sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def plural(unit: str) -> str:
    """``batch`` -> ``batches``, ``step`` -> ``steps`` (the units progress reports count)."""
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class Lines:
    """tqdm's interface (``update``, ``set_postfix``, ``set_description``, ``write``, ``close``) as plain lines:
    ``train: 120/1000 steps (12%), 3.20 steps/s, 4m35s left, loss=0.51``."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, every_s: float = 30.0,
                 stream: TextIO | None = None, disable: bool = False):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.every_s, self.stream, self.disable = every_s, stream or sys.stderr, disable
        self.start = self.last = time.monotonic()
        self.start_n, self.postfix, self._closed, self._shown = initial, "", False, initial
        self._next_fraction = 0.1

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        due = now - self.last >= self.every_s
        if self.total:
            due = due or self.n / self.total >= self._next_fraction
        if due and not self.disable:
            self._emit(now)

    def _emit(self, now: float) -> None:
        self.last, self._shown = now, self.n
        done = self.n - self.start_n
        rate = done / max(now - self.start, 1e-9)
        units = plural(self.unit)
        parts = [f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {units}"]
        if self.total:
            parts[0] += f" ({self.n / self.total:.0%})"
            self._next_fraction = (int(self.n / self.total * 10) + 1) / 10
            if 0 < rate and self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        parts.insert(1, f"{rate:.2f} {units}/s" if rate < 10 else f"{rate:,.0f} {units}/s")
        self.stream.write(", ".join(parts) + (f", {self.postfix}" if self.postfix else "") + "\n")
        self.stream.flush()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = " ".join(f"{k}={v}" for k, v in values.items())

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def write(self, message: str) -> None:
        if not self.disable:
            self.stream.write(message + "\n")
            self.stream.flush()

    def close(self) -> None:
        if not self._closed and not self.disable and self.n != self._shown:  # the end, unless just shown
            self._emit(time.monotonic())
        self._closed = True

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int | None = None, desc: str = "", unit: str = "it", initial: int = 0, enabled: bool = True,
             every_s: float = 30.0):
    """A progress report for ``total`` units of work: tqdm on a terminal, ``Lines`` elsewhere; silent when
    ``enabled`` is False (or ``DISTILL_PROGRESS=off``)."""
    chosen = mode()
    disable = not enabled or chosen == "off"
    if chosen == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=disable, dynamic_ncols=True)
    return Lines(total, desc, unit, initial, every_s, disable=disable)


def track(items: Iterable[Any], total: int | None = None, desc: str = "", unit: str = "it",
          enabled: bool = True) -> Iterator[Any]:
    """Iterate ``items`` with a progress report."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)  # type: ignore[arg-type]
    with progress(total, desc, unit, enabled=enabled) as bar:
        for item in items:
            yield item
            bar.update(1)


__all__ = ["progress", "track", "mode", "Lines", "MODES"]
