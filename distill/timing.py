"""One way to time a call: warm-up calls first, then the median of several timed ones (a GPU synchronised
around each), so a reported latency or rate is neither a cold start nor one lucky or unlucky call."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable


def seconds_per_call(fn: Callable[[], Any], warmup: int = 2, repeat: int = 5, device: Any = "cpu",
                     calls: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeat`` timings of ``calls`` calls each, after ``warmup`` calls."""
    sync = _sync(device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        sync()
        tic = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - tic) / calls)
    return statistics.median(times)


def compare(fns: dict[str, Callable[[], Any]], warmup: int = 3, rounds: int = 7, device: Any = "cpu",
            min_seconds: float = 0.02) -> dict[str, float]:
    """Median seconds per call of each of ``fns``, timed alternately: every round times each one in turn (the
    order turning each round), so a slow spell of the machine falls on all of them and not on whichever ran
    then. Each timing repeats a fast call until it lasts ``min_seconds`` (the count fixed after warm-up)."""
    sync, names = _sync(device), list(fns)
    if not names:  # nothing to time (e.g. two text-only models in eval)
        return {}
    calls = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        sync()
        tic = time.perf_counter()
        fns[name]()
        sync()
        calls[name] = max(1, min(1000, int(min_seconds / max(time.perf_counter() - tic, 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            sync()
            tic = time.perf_counter()
            for _ in range(calls[name]):
                fns[name]()
            sync()
            times[name].append((time.perf_counter() - tic) / calls[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _sync(device: Any) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


__all__ = ["seconds_per_call", "compare"]
