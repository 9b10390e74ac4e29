"""Mixed precision: what ``precision: auto`` means on this machine, in one place for fit, plan and cache."""
from __future__ import annotations

import torch


def native_bf16(device: torch.device | str | None = None) -> bool:
    """True on GPUs that compute in bf16 (compute capability 8.0+: A100, RTX 30xx, H100, ...). T4 and V100
    only emulate it (``torch.cuda.is_bf16_supported()`` still says True there), slower than fp16."""
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def auto_precision(cpu: bool = False) -> str:
    """``precision: auto``: bf16 on GPUs that have it natively, fp16 on older GPUs, no autocast on a CPU."""
    if cpu or not torch.cuda.is_available():
        return "no"
    return "bf16" if native_bf16() else "fp16"


def resolve_precision(requested: str, cpu: bool = False) -> str:
    return auto_precision(cpu) if requested == "auto" else requested


def amp_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """Autocast dtype for inference on a GPU (teacher forward passes): bf16 where native, else fp16."""
    return torch.bfloat16 if native_bf16(device) else torch.float16
