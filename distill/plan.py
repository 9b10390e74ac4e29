"""``distill plan``: what batch size, accumulation and checkpointing fit a VRAM budget.

A short probe builds the recipe's student and runs training steps on random inputs (224 px images
or full-length token sequences, teacher targets as from the cache, since cached training keeps no
teacher on the GPU) at two micro-batch sizes, with and without gradient checkpointing:

* on a GPU it reads ``torch.cuda.max_memory_allocated`` (what the step really takes), then checks
  the chosen size with one real step;
* on a CPU it uses a documented formula: ``params x 16 B`` (fp32 weights, gradients and AdamW's two
  moments; 8-bit AdamW: ``params x 10 B``) ``+ batch x activations per sample`` (the bytes autograd
  saves for backward, counted with ``saved_tensors_hooks``; halved under bf16/fp16 autocast)
  ``+ 10%`` allocator slack.

The step probed is the training step itself (``loop.train_step`` of the distillation step module), on a
batch shaped as a cached run feeds it (``probe_batch``).

Peak memory is affine in the micro-batch, so two probes give the per-sample and fixed parts.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import Recipe
from .loop import train_step

CANDIDATES = (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1)


def parse_size(text: str) -> int:
    """``"8GB"``, ``"8 GiB"``, ``"7.5G"``, ``"8000MB"`` -> bytes (GB taken as GiB, as GPUs are sold).
    A unit is required (a bare ``8`` is ambiguous) and the size must be positive."""
    from .errors import RecipeError

    bad = RecipeError(f"--vram {text!r}: use a positive size with a unit, such as 8GB, 12GiB or 7500MB")
    t = str(text).strip().upper().replace(" ", "")
    t = t[:-1] if t.endswith("B") else t
    t = t[:-1] if t.endswith("I") else t
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    if not t or t[-1] not in units:
        raise bad
    try:
        value = float(t[:-1])
    except ValueError:
        raise bad from None
    if not math.isfinite(value) or value <= 0:
        raise bad
    return int(value * units[t[-1]])


@dataclass
class Probe:
    checkpointing: bool
    fixed_bytes: float  # weights, gradients, optimiser state, workspace
    per_sample_bytes: float
    step_s_per_sample: float
    measured: str  # "cuda" or "formula"

    def peak(self, batch: int) -> float:
        return self.fixed_bytes + batch * self.per_sample_bytes

    def max_batch(self, budget: float) -> int:
        return next((b for b in CANDIDATES if self.peak(b) <= budget), 0)


@dataclass
class Plan:
    budget: int
    effective_batch: int
    probes: list[Probe] = field(default_factory=list)
    batch_size: int = 0
    grad_accum: int = 1
    checkpointing: bool = False
    queue: int = 0
    note: str = ""

    def overrides(self) -> str:
        out = f"train.batch_size={self.batch_size} train.grad_accum={self.grad_accum}"
        if self.checkpointing:
            out += " train.grad_checkpointing=true"
        if self.queue:
            out += f" loss.kwargs.contrastive.queue={self.queue}"
        return out

    def table(self) -> str:
        lines = [f"budget {self.budget / 2**30:.1f} GiB, effective batch {self.effective_batch}",
                 f"{'checkpointing':14} {'fixed MiB':>10} {'MiB/sample':>11} {'max batch':>10} {'ms/sample':>10} {'how':>8}"]
        for p in self.probes:
            lines.append(f"{str(p.checkpointing):14} {p.fixed_bytes / 2**20:10.0f} {p.per_sample_bytes / 2**20:11.2f} "
                         f"{p.max_batch(self.budget):10d} {p.step_s_per_sample * 1000:10.2f} {p.measured:>8}")
        return "\n".join(lines)


def probe_batch(student, batch: int, device: Any = "cpu") -> dict[str, Any]:
    """A batch of ``batch`` random rows as a cached run feeds the step: 224 px views (or full-length token
    sequences) and the teacher's targets in the batch (a cached run keeps no teacher on the device)."""
    dim = student.embed_dim
    out: dict[str, Any] = {"teacher_emb": {"image": torch.randn(batch, dim), "text": torch.randn(batch, dim)}}
    if student.image is not None:
        s = student.preprocess.image_size
        out["views"] = {"student": torch.randint(0, 256, (batch, 3, s, s), dtype=torch.uint8, device=device)}
    else:
        ids = torch.randint(1000, 2000, (batch, student.text.context_length), device=device)
        out["tokens"] = {"student": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}}
    return out


def step_module(student, recipe: Recipe):
    """The distillation step of ``student`` with its recipe's losses, on targets carried by the batch."""
    from .cache.targets import InBatch
    from .losses import DistillLoss
    from .trainer import DistillStep

    return DistillStep(InBatch(student.embed_dim), student, DistillLoss(recipe.loss.weights, recipe.loss.kwargs))


def _saved_bytes(step, batch: dict[str, Any], optimizer) -> int:
    """Bytes autograd keeps for backward during one training step (each storage counted once)."""
    seen: dict[Any, int] = {}

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.device)
        seen[key] = max(seen.get(key, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        train_step(step, batch, optimizer, lr=1e-5)
    params = {p.untyped_storage().data_ptr() for p in step.parameters()}  # counted with the weights
    return sum(v for (ptr, _), v in seen.items() if ptr not in params)


def probe(recipe: Recipe, device: str | torch.device | None = None, embed_dim: int | None = None,
          batches: tuple[int, int] = (4, 8)) -> list[Probe]:
    """Measure fixed and per-sample memory and time, without and with gradient checkpointing."""
    from .students import create_student
    from .teachers import TEACHERS

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if embed_dim is None:
        name = recipe.teacher.name
        embed_dim = int(TEACHERS.meta(name).get("embed_dim", 512)) if name in TEACHERS else 512
    kwargs = dict(recipe.student.kwargs)
    kwargs.pop("pretrained", None)  # the probe needs shapes, not weights (no hub here)
    if recipe.data.image_size is not None and "+" not in recipe.student.name:
        kwargs.setdefault("image_size", recipe.data.image_size)
    from .precision import resolve_precision

    prec = resolve_precision(recipe.train.precision, cpu=device.type != "cuda")  # what `distill fit` will use
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
    opt_bytes = 10 if recipe.optim.optimizer == "adamw8bit" else 16
    out = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        student = create_student(recipe.student.name, embed_dim=embed_dim, **kwargs).to(device).train()
        if ckpt and not student.set_grad_checkpointing(True):
            continue
        if recipe.train.channels_last:
            student.to(memory_format=torch.channels_last)
        step = step_module(student, recipe).to(device)
        n_params = sum(p.numel() for p in student.parameters() if p.requires_grad)
        opt = torch.optim.AdamW(step.parameters(), lr=1e-5)
        peaks, times = [], []
        for b in batches:
            batch = probe_batch(student, b, device)
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
                    train_step(step, batch, opt, lr=1e-5)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    tic = time.perf_counter()
                    train_step(step, batch, opt, lr=1e-5)
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - tic)
                peaks.append(torch.cuda.max_memory_allocated())
            else:
                tic = time.perf_counter()
                saved = _saved_bytes(step, batch, opt)
                times.append(time.perf_counter() - tic)
                scale = 0.5 if amp is not None else 1.0
                peaks.append(1.1 * (n_params * opt_bytes + saved * scale))
        per_sample = max((peaks[1] - peaks[0]) / (batches[1] - batches[0]), 1.0)
        fixed = max(peaks[0] - per_sample * batches[0], 0.0)
        out.append(Probe(ckpt, fixed, per_sample, times[1] / batches[1], "cuda" if device.type == "cuda" else "formula"))
        del student, step, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def make_plan(recipe: Recipe, vram: str | int, device: str | None = None, effective_batch: int | None = None) -> Plan:
    """Pick micro-batch, accumulation and checkpointing for ``vram`` (bytes or ``"8GB"``)."""
    budget = parse_size(vram) if isinstance(vram, str) else int(vram)
    if budget <= 0:
        from .errors import RecipeError

        raise RecipeError(f"--vram {vram!r}: must be a positive size")
    target = effective_batch or recipe.train.batch_size * recipe.train.grad_accum
    plan = Plan(int(budget * 0.92), target)  # headroom for fragmentation and the data pipeline
    plan.probes = probe(recipe, device)
    fits = [(p, min(p.max_batch(plan.budget), target)) for p in plan.probes]
    fits = [(p, b) for p, b in fits if b > 0]
    if not fits:
        plan.note = "even a micro-batch of 1 does not fit: use a smaller student or image size"
        return plan
    # without checkpointing when a micro-batch of 64+ fits (it costs ~30% time), else the biggest batch
    plain = next(((p, b) for p, b in fits if not p.checkpointing and b >= min(64, target)), None)
    best, batch = plain or max(fits, key=lambda pb: pb[1])
    plan.checkpointing, plan.batch_size = best.checkpointing, batch
    plan.grad_accum = math.ceil(target / batch)
    if recipe.loss.weights.get("contrastive") and plan.grad_accum > 1:
        plan.queue = target * 4  # cached teacher embeddings as negatives: the batch's share and more
    plan.note = (f"peak ~{best.peak(batch) / 2**30:.2f} GiB at micro-batch {batch}; "
                 f"~{best.step_s_per_sample * target:.2f} s per optimiser step of {target} on this device")
    return plan
