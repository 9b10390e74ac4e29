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


def _sync(device: Any) -> Callable[[], None]:
    if str(device).startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return lambda: None


__all__ = ["seconds_per_call"]
