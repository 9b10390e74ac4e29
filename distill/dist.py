"""Several processes (``accelerate launch``, ``torchrun``): rank, collectives, and stopping together.

Everything here is a no-op in a single process. Under a launcher the process group comes from
accelerate's ``PartialState`` (gloo on CPUs, NCCL on GPUs), created once with the run's timeout.

Two rules keep the processes in step:
- a region that can fail on one process only (reading a batch, a forward pass, writing a checkpoint,
  a hook on the main process) runs inside ``stop_together(what)``: no collective inside it, and one at its
  end through which every process learns whether any failed, so every process stops, each with one line;
- every collective here names itself: a process that stops answering (killed, or stuck longer than
  ``train.dist_timeout``) ends the others with a ``ProcessStoppedError`` naming the collective and the
  process they waited for, not a backend traceback.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from .errors import ProcessStoppedError, first_line, user_message

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
    if not torch.distributed.is_initialized():  # first call: these settings create the process group
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


def where() -> str:
    """`` (process 1 of 2)`` under several processes, ``""`` in one."""
    return f" (process {rank()} of {world()})" if world() > 1 else ""


def _call(what: str, fn: Callable[[], Any]) -> Any:
    """Run the collective ``fn``; a process that does not answer (killed, crashed, or slower than the
    timeout) stops this one with a ProcessStoppedError that names the collective and the process."""
    try:
        return fn()
    except RuntimeError as e:
        backend = type(e).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError") or any(
            w in str(e) for w in ("Connection closed", "Connection reset", "Timed out", "timed out", "gloo",
                                  "NCCL", "Broken pipe"))
        if not backend:
            raise
        peer = f"process {1 - rank()}" if world() == 2 else "another process"
        raise ProcessStoppedError(f"{peer} of {world()} stopped answering while process {rank()} waited in {what}: "
                                  "it died, was killed, or took longer than train.dist_timeout "
                                  f"({first_line(e, 160)})") from None


def barrier(what: str = "a barrier") -> None:
    if _active():
        _call(what, torch.distributed.barrier)


def gather_objects(obj: Any, what: str = "a gather") -> list[Any]:
    """Every process's ``obj``, in rank order (one process: ``[obj]``)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * world()
    _call(what, lambda: torch.distributed.all_gather_object(out, obj))
    return out


def broadcast_object(obj: Any, what: str = "a broadcast") -> Any:
    """The main process's ``obj`` on every process."""
    if not _active():
        return obj
    box = [obj]
    _call(what, lambda: torch.distributed.broadcast_object_list(box, src=0))
    return box[0]


def mean(values: torch.Tensor, what: str = "the mean of the step's loss") -> torch.Tensor:
    """Element-wise mean over processes (for logging the loss of the whole global batch)."""
    if not _active():
        return values
    values = values.detach().clone()
    _call(what, lambda: torch.distributed.all_reduce(values))
    return values / world()


def any_process(flag: bool, device: torch.device | None = None, what: str = "a status check") -> bool:
    """True on every process when ``flag`` is True on any (one collective)."""
    if not _active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or _device())
    _call(what, lambda: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
    return bool(t.item() > 0)


@contextmanager
def stop_together(what: str, device: torch.device | None = None) -> Iterator[None]:
    """A region that may fail on one process only (it must hold no collective). At its end every process
    learns whether any failed (one collective); then all stop: the failing one with its own error, every
    other one with a ProcessStoppedError naming that process and its cause (``what`` says where)."""
    error: BaseException | None = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, on every process
        error = e
    if not _active():
        if error is not None:
            raise error
        return
    if not any_process(error is not None, device, f"the status check after {what}"):
        return
    message = None if error is None else (user_message(error) or f"{type(error).__name__}: {first_line(error, 200)}")
    reports = gather_objects(message, f"the messages after {what}")
    if error is not None:
        raise error  # this process's own error, with its type (and, for a bug, its traceback)
    who = next(r for r, m in enumerate(reports) if m is not None)
    raise ProcessStoppedError(f"stopped because another process failed {what}: {reports[who]} "
                              f"(process {who} of {world()})")


def average_gradients(params: list[torch.nn.Parameter], what: str = "the gradient average") -> None:
    """Average the gradients of ``params`` over processes (one all-reduce of one flat buffer), as DDP does:
    called when every process has finished its backward, so no process waits on a failed one."""
    if not _active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads]).to(collective_device(grads[0].device))
    _call(what, lambda: torch.distributed.all_reduce(flat))
    flat /= world()
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g).to(g.device))
        offset += g.numel()


def broadcast_module(module: torch.nn.Module, what: str = "the model's initial weights") -> None:
    """The main process's parameters and buffers on every process (as DDP does when it wraps a model)."""
    if not _active():
        return
    tensors = [t for t in (*module.parameters(), *module.buffers()) if t.numel()]
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        same = [t for t in tensors if t.dtype == dtype]
        flat = torch.cat([t.detach().reshape(-1) for t in same]).to(collective_device(same[0].device))
        _call(what, lambda flat=flat: torch.distributed.broadcast(flat, src=0))
        offset = 0
        with torch.no_grad():
            for t in same:
                t.copy_(flat[offset:offset + t.numel()].view_as(t).to(t.device))
                offset += t.numel()


class _GatherRows(torch.autograd.Function):
    """all_gather whose backward sends each row's gradient (summed over the processes whose loss used
    it) back to the process that owns the row: exact gradients through gathered embeddings."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(world())]
        _call("the gather of the loss's rows", lambda: torch.distributed.all_gather(parts, x.contiguous()))
        ctx.rank, ctx.rows = rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        _call("the gradient of the loss's gathered rows", lambda: torch.distributed.all_reduce(grad))
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
        _call("the gather of the loss's rows", lambda: torch.distributed.all_gather(parts, padded.detach().contiguous()))
        full = torch.cat(parts)
    rows = torch.cat([full[r * top:r * top + n] for r, n in enumerate(sizes)])
    return rows, sum(sizes[:rank()])


def _sizes(n: int, device: torch.device) -> list[int]:
    t = torch.tensor([n], device=device)
    parts = [torch.zeros_like(t) for _ in range(world())]
    _call("the gather of the batch sizes", lambda: torch.distributed.all_gather(parts, t))
    return [int(p) for p in parts]


def collective_device(device: torch.device) -> torch.device:
    """Where small tensors for collectives live: the GPU under NCCL, the CPU under gloo."""
    return _device() if _active() else device


def _device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
