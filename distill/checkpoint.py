"""Training checkpoints without pickle: weights, optimiser state, RNG and the step module's extra
state (e.g. a queue of negatives) in safetensors, the rest (history, data position, grad-scaler state)
in JSON. A checkpoint directory is written under a temp name and renamed into place, so a crash never
leaves a half-written ``step_*`` folder behind."""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from .io import load_tensors, read_json, save_tensors, write_json

_PREFIX = "step_"


def _split_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, plain = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, slots in state["state"].items():
        plain["state"][str(pid)] = {}
        for name, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
                plain["state"][str(pid)][name] = {"tensor": f"{pid}.{name}"}
            else:
                plain["state"][str(pid)][name] = {"value": value}
    return tensors, plain


def _join_optimizer(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, slots in plain["state"].items():
        state[int(pid)] = {n: tensors[v["tensor"]] if "tensor" in v else v["value"] for n, v in slots.items()}
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> dict[str, torch.Tensor]:
    """This process's random state (torch's, and each CUDA device's)."""
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda{i}"] = s
    return out


def _set_rng_state(states: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Restore process ``rank``'s own random state (a checkpoint holds every process's as ``rank{r}.``; one
    from before it held the main process's only: then every process takes that)."""
    prefix = f"rank{rank}."
    if not any(k.startswith(prefix) for k in states):
        prefix = "rank0." if any(k.startswith("rank0.") for k in states) else ""
    mine = {k[len(prefix):]: v for k, v in states.items() if k.startswith(prefix)}
    torch.set_rng_state(mine["torch"])
    cuda = [mine[k] for k in sorted(mine) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def _extra_tensors(module: Any) -> dict[str, torch.Tensor]:
    """State a module keeps outside its parameters (``extra_tensors()``), e.g. queues of negatives."""
    return dict(module.extra_tensors()) if hasattr(module, "extra_tensors") else {}


def save_checkpoint(
    root: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
    keep: int = 2, scaler: Any = None, extra: Any = None, rngs: list[dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write ``root/step_XXXXXXXX`` atomically and keep only the newest ``keep`` checkpoints.

    ``scaler``: an fp16 GradScaler (its scale and growth tracker are saved); ``extra``: a module with
    ``extra_tensors()`` / ``load_extra_tensors()`` (queues and other state outside ``state_dict``);
    ``rngs``: every process's random state, in rank order (default: this process's)."""
    root = Path(root)
    final = root / f"{_PREFIX}{step:08d}"
    tmp = root / f".tmp_{_PREFIX}{step:08d}_{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_tensors(tmp / "model.safetensors", model.state_dict())
        opt_tensors, opt_plain = _split_optimizer(optimizer.state_dict())
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        write_json(tmp / "optimizer.json", opt_plain)
        save_tensors(tmp / "rng.safetensors", {f"rank{r}.{k}": v for r, state in enumerate(rngs or [rng_state()])
                                               for k, v in state.items()})
        extra_t = _extra_tensors(extra) if extra is not None else {}
        if extra_t:
            save_tensors(tmp / "extra.safetensors", extra_t)
        scaler_state = scaler.state_dict() if scaler is not None and hasattr(scaler, "state_dict") else None
        write_json(tmp / "state.json", {"step": step, **state, "scaler": scaler_state})
    except BaseException:  # a full disk, a crash: no half-written checkpoint is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / "state.json").exists()]
    return sorted(done, key=lambda p: int(p.name[len(_PREFIX):]))


def load_checkpoint(
    path: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True,
    scaler: Any = None, extra: Any = None, rank: int = 0,
) -> dict[str, Any]:
    """Restore model (+ optimiser, process ``rank``'s RNG, grad scaler, extra state) in place; returns the
    JSON state."""
    path = Path(path)
    model.load_state_dict(load_tensors(path / "model.safetensors"))
    if optimizer is not None:
        tensors = load_tensors(path / "optimizer.safetensors")  # load_state_dict moves them to the params
        optimizer.load_state_dict(_join_optimizer(tensors, read_json(path / "optimizer.json")))
    if restore_rng:
        _set_rng_state(load_tensors(path / "rng.safetensors"), rank)
    state = read_json(path / "state.json")
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if extra is not None and hasattr(extra, "load_extra_tensors") and (path / "extra.safetensors").exists():
        extra.load_extra_tensors(load_tensors(path / "extra.safetensors"))
    return state
