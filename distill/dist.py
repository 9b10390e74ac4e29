"""Several processes (``accelerate launch``, ``torchrun``): rank, barriers, gathers and collective stops.

Everything here is a no-op in a single process. Under a launcher the process group comes from
accelerate's ``PartialState`` (gloo on CPUs, NCCL on GPUs), created once with the run's timeout: a
process that waits longer than that for the others stops instead of hanging.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch

DEFAULT_TIMEOUT_S = 1800


def launched() -> bool:
    """True when a launcher started several processes (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def state(cpu: bool = False, timeout_s: int | None = None):
    """accelerate's PartialState (the process group), or None in a single process. The first call
    decides CPU (gloo) vs GPU and the collective timeout."""
    if not launched():
        return None
    from accelerate import PartialState

    kwargs = {}
    if not PartialState._shared_state:  # first call: these settings create the process group
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s or DEFAULT_TIMEOUT_S)
    return PartialState(cpu=cpu or not torch.cuda.is_available(), **kwargs)


def shutdown() -> None:
    """Close the process group before exiting: a process that exits with it open may abort (gloo)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        try:
            torch.distributed.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def world() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if _active():
        torch.distributed.barrier()


def gather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj``, in rank order (one process: ``[obj]``)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """The main process's ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def mean(values: torch.Tensor) -> torch.Tensor:
    """Element-wise mean over processes (for logging the loss of the whole global batch)."""
    if not _active():
        return values
    values = values.detach().clone()
    torch.distributed.all_reduce(values)
    return values / world()


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward sends each row's gradient (summed over the processes whose loss used
    it) back to the process that owns the row: exact gradients through gathered embeddings."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world())]
        torch.distributed.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather_rows(x: torch.Tensor, with_grad: bool = False) -> tuple[torch.Tensor, int]:
    """(rows of ``x`` from every process, concatenated in rank order; where this process's rows start).

    Batches may differ in size between processes (skipped rows): they are padded for the transfer and
    unpadded after. ``with_grad``: gradients flow back to each process's own rows (``_GatherRows``)."""
    if not _active():
        return x, 0
    sizes = _sizes(len(x), x.device)
    top = max(sizes)
    padded = x if len(x) == top else torch.cat([x, x.new_zeros((top - len(x), *x.shape[1:]))])
    if with_grad and x.requires_grad:
        full = _GatherRows.apply(padded)
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        torch.distributed.all_gather(parts, padded.detach().contiguous())
        full = torch.cat(parts)
    rows = torch.cat([full[r * top:r * top + n] for r, n in enumerate(sizes)])
    return rows, sum(sizes[:rank()])


def _sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], device=device)
    parts = [torch.zeros_like(t) for _ in range(world())]
    torch.distributed.all_gather(parts, t)
    return [int(p) for p in parts]


def any_process(flag: bool, device: torch.device | None = None) -> bool:
    """True on every process when ``flag`` is True on any (one collective): stops are collective."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or _device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def collective_device(device: torch.device) -> torch.device:
    """Where small tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
    return _device() if _active() else device


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
