"""The training loop every run shares (distillation and tuning), through accelerate.

``TrainLoop`` owns the optimiser, warm-up + cosine schedule, gradient accumulation and clipping, mixed
precision, checkpoints and resume, logs, skipped rows and the NaN guard. A run is tied to its output
folder: ``run.json`` and every checkpoint record what the run is (recipe, data, teacher, student), so
a folder holding another run is never resumed, pruned or overwritten by accident.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import dist
from ._imports import require
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Recipe, save_recipe
from .data import EpochBatchSampler, Rows
from .run import SkipLog
from .errors import NonFiniteLossError, RecipeError, RunConflictError
from .io import atomic_write_text, read_json, write_json
from .precision import resolve_precision

log = logging.getLogger(__name__)

@dataclass
class FitResult:
    output_dir: Path
    history: dict[str, list[float]]
    model: nn.Module
    model_dir: Path
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def student(self) -> nn.Module:
        return self.model


# Recipe fields that do not change what a run computes: a resumed run may differ in them.
_NOT_RUN_FIELDS = {
    "train": ("output_dir", "resume", "overwrite", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
              "progress", "health_every", "health_rows", "cpu", "grad_checkpointing", "channels_last", "compile",
              "dist_timeout"),
    "data": ("train", "num_workers"),
    "cache": ("dir", "allow_stale"),
}
RUN_FILES = ("log.jsonl", "health.jsonl", "skipped.jsonl", "run.json")
# what a run writes in its output folder (and train.overwrite deletes): no input may live there
RUN_PATHS = (*RUN_FILES, "recipe.yaml", "checkpoints", "student", "model", "features")


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to ``cfg.lr`` then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    o, t = cfg.optim, cfg.train
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    progress = (step - o.warmup_steps) / max(1, t.max_steps - o.warmup_steps)
    floor = o.lr * o.min_lr_ratio
    return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def data_fingerprint(rows: Rows, image_keys: list[str | None] | None = None, progress: bool = True) -> str:
    """Hash of what a run trains on, row by row: each image's content key (``cache.keys``) and its
    caption. Independent of where the data folder lives (a moved folder still resumes), but not of
    what the images hold: an edited or swapped image makes it another run. ``image_keys``: the rows'
    keys when already known (a cached run), else the images are hashed (one pass over the files)."""
    if image_keys is None:
        from .cache.keys import image_keys as content_keys

        unique = list(dict.fromkeys(p for p in rows.images if p))
        keys, _ = content_keys(unique, progress=progress)
        by_path = dict(zip(unique, keys))
        image_keys = [by_path[p] if p else None for p in rows.images]
    h = hashlib.sha256()
    for k, c in zip(image_keys, rows.captions):
        h.update(f"{k or ''}\0{c or ''}\n".encode("utf-8"))
    return h.hexdigest()[:20]


def run_identity(recipe: Recipe, **parts: Any) -> dict[str, Any]:
    """What makes a run this run: the recipe fields that change its numbers, plus ``parts`` (teacher
    identity, student config, data fingerprint)."""
    rec, default = _run_fields(recipe.to_dict()), _run_fields(Recipe().to_dict())
    # fields at their default are left out: an option added in a later version does not make every
    # earlier run "another run" (comparisons fill the defaults back in: _with_defaults)
    rec = {s: {k: v for k, v in vals.items() if default.get(s, {}).get(k, _MISSING) != v} for s, vals in rec.items()}
    return {"recipe": rec, **parts}


_MISSING = object()


def _run_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict without the fields that do not change a run's numbers (_NOT_RUN_FIELDS)."""
    for section, keys in _NOT_RUN_FIELDS.items():
        for k in keys:
            rec.get(section, {}).pop(k, None)
    return rec


def _with_defaults(run: dict[str, Any]) -> dict[str, Any]:
    """A run identity with the recipe's default values filled in (to name what differs)."""
    if not isinstance(run.get("recipe"), dict):
        return run
    default, recorded = _run_fields(Recipe().to_dict()), run["recipe"]
    rec = {s: {**default.get(s, {}), **(recorded.get(s) if isinstance(recorded.get(s), dict) else {})}
           for s in {**default, **recorded}}
    return {**run, "recipe": rec}


def _hash(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} there vs {b!r} now"]


def recipe_inputs(recipe: Recipe) -> dict[str, str]:
    """``{what: path}`` of every file or folder a recipe names that exists (teacher and student folders and
    weights, tokenizers, data, packed store, cache): what a run reads and must never write over."""
    from .outputs import inputs_of

    return inputs_of({f"what {key} names": value for key, value in (
        ("teacher.name", recipe.teacher.name), ("teacher.pretrained", recipe.teacher.pretrained),
        ("teacher.kwargs", recipe.teacher.kwargs), ("student.name", recipe.student.name),
        ("student.kwargs", recipe.student.kwargs), ("data.train", recipe.data.train),
        ("data.packed", recipe.data.packed), ("cache.dir", recipe.cache.dir))})


def run_inputs(source: Any, rows: Rows, teacher: Any = None, service: Any = None) -> dict[str, str]:
    """``{what: path}`` a run reads beyond its recipe: the data it was given, the folders its images are in,
    the folder of a teacher object and the cache of a teacher service."""
    from .outputs import image_folders, inputs_of

    return inputs_of({"the training data": source if isinstance(source, (str, Path)) else None,
                      "an image folder of the data": image_folders(rows.images),
                      "the teacher": [getattr(teacher, "path", None), getattr(teacher, "name", None)],
                      "the teacher cache": getattr(service, "dir", None)})


def check_output_dir(output_dir: Path, inputs: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse an output folder that holds another kind of artifact (a cache, an export, a saved model), that
    holds one of the run's inputs (unless ``train.overwrite``: the run is written beside it), or where the
    files a run writes (and ``train.overwrite`` deletes) would hold one."""
    from .outputs import RUN, describe, inputs_within, written_by_us

    for name in RUN_PATHS:  # never, not even with train.overwrite
        found = inputs_within(output_dir / name, inputs)
        if found:
            what, path = found[0]
            raise RunConflictError(f"train.output_dir: {output_dir / name} is or holds {what} ({path}), an input of "
                                   f"this run, and a run writes its {name} there: choose another train.output_dir")
    found = inputs_within(output_dir, inputs)
    if found and not overwrite:
        what, path = found[0]
        raise RunConflictError(f"train.output_dir: {output_dir} holds {what} ({path}), an input of this run: choose "
                               "another train.output_dir, or train.overwrite=true to write the run beside it (the "
                               "input is left as it is)")
    held = describe(output_dir)
    if held != RUN and written_by_us(held):
        raise RunConflictError(f"train.output_dir: {output_dir} holds {held}; a run goes into an empty folder or one "
                               "of its own runs: choose another train.output_dir")
    taken = [name for name in RUN_PATHS if (output_dir / name).exists()] if held != RUN else []
    if taken:  # not a run's: a run would write over (with train.overwrite, delete) what someone else put there
        raise RunConflictError(f"train.output_dir: {output_dir} holds {taken[0]}, and no run of clip-distill wrote it "
                               f"(there is no run.json): a run writes its {taken[0]} there; choose another "
                               "train.output_dir")


def claim_output_dir(output_dir: Path, train_cfg, run: dict[str, Any], main: bool = True,
                     inputs: dict[str, Any] | None = None) -> Path | None:
    """Make ``output_dir`` this run's: returns the checkpoint to resume from (or None to start).

    A folder that holds work (checkpoints, logs, a saved model) is resumed only with ``train.resume``
    and only when its checkpoints record this same run; ``train.overwrite`` deletes that work first.
    A folder holding another kind of artifact, or whose run files would hold one of ``inputs``, is
    refused (``check_output_dir``). Anything else stops with RunConflictError, naming what differs.
    Only the main process writes."""
    check_output_dir(output_dir, inputs or {}, train_cfg.overwrite)
    root = output_dir / "checkpoints"
    ckpts = list_checkpoints(root)
    work = [output_dir / f for f in RUN_FILES[:1] if (output_dir / f).exists()] + ckpts
    for model in ("student", "model"):
        if (output_dir / model / "model.safetensors").exists():
            work.append(output_dir / model)
    rid = _hash(run)
    if train_cfg.overwrite and (work or root.exists()):
        if main:
            log.warning("train.overwrite: deleting the previous run in %s", output_dir)
            for f in RUN_FILES:
                (output_dir / f).unlink(missing_ok=True)
            for d in (root, output_dir / "student", output_dir / "model"):  # features/ is keyed: kept
                shutil.rmtree(d, ignore_errors=True)
        ckpts, work = [], []
    if not work:
        return None
    if not train_cfg.resume:
        what = f"checkpoints up to step {ckpts[-1].name.split('_')[-1].lstrip('0') or 0}" if ckpts else \
            "the logs or model of an earlier run"
        raise RunConflictError(f"{output_dir} already holds {what}; add train.resume=true to continue that run, "
                               "train.overwrite=true to delete it and start again, or choose another train.output_dir")
    if not ckpts:  # logs of a run that died before its first checkpoint: start it again
        _check_same_run(output_dir, run, rid, None)
        if main:
            for f in RUN_FILES[:3]:
                (output_dir / f).unlink(missing_ok=True)
        return None
    _check_same_run(output_dir, run, rid, read_json(ckpts[-1] / "state.json").get("run"))
    return ckpts[-1]


def _check_same_run(output_dir: Path, run: dict[str, Any], rid: str, ckpt_rid: str | None) -> None:
    recorded = read_json(output_dir / "run.json") if (output_dir / "run.json").exists() else None
    recorded_id = recorded.get("id") if isinstance(recorded, dict) else None
    if ckpt_rid is not None and recorded_id not in (None, ckpt_rid):
        recorded = None  # run.json is of a later attempt; the checkpoint's own id decides
    theirs = ckpt_rid or recorded_id
    if theirs == rid:
        return
    if theirs is None:
        raise RunConflictError(f"{output_dir} holds checkpoints that record no run (an older clip-distill): they "
                               "cannot be matched to this recipe; use train.overwrite=true or another train.output_dir")
    diff = _differences(_with_defaults(recorded["run"]), _with_defaults(run)) if recorded and "run" in recorded else []
    diff = ["data: the rows differ (an image's content, a caption, or which rows there are)" if d.startswith("data:")
            else d for d in diff]
    detail = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "") if diff else \
        "recipe, data, teacher or student"
    raise RunConflictError(f"{output_dir} holds checkpoints of another run ({detail}); train.resume continues only "
                           "the same run: use another train.output_dir, or train.overwrite=true to delete that one")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step``: a resumed run writes the later ones again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))


class StepTimes:
    """Where a run's wall time goes, in seconds: waiting for the next batch (``data``: loading, decoding,
    crops, cache gathers in the loader), the training step (``step``: forward, loss, backward, optimiser),
    ``log`` (records, progress bar), ``hooks`` (health checks) and ``checkpoint``. ``window`` holds the same
    since the last log line: the live data-wait fraction comes from it."""

    PARTS = ("data", "step", "log", "hooks", "checkpoint")

    def __init__(self):
        self.total = dict.fromkeys(self.PARTS, 0.0)
        self.window = dict.fromkeys(self.PARTS, 0.0)
        self.start = dict.fromkeys(self.PARTS, 0.0)  # totals when the loader had warmed up (``mark``)
        self.start_steps = 0

    def mark(self, steps: int) -> None:
        """Remember where the steady state starts (after the loader's first batches)."""
        self.start, self.start_steps = dict(self.total), steps

    def steady(self) -> dict[str, float]:
        return {k: self.total[k] - self.start[k] for k in self.PARTS}

    @contextmanager
    def __call__(self, part: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t0
            self.total[part] += dt
            self.window[part] += dt

    def data_fraction(self, window: bool = True) -> float:
        """Waiting for data as a fraction of data + step time."""
        t = self.window if window else self.total
        return t["data"] / max(t["data"] + t["step"], 1e-9)

    def reset_window(self) -> None:
        self.window = dict.fromkeys(self.PARTS, 0.0)


SLOW_DATA = 0.25  # warn once when waiting for data takes more than this share of the step time


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            # biases, norms, embeddings' scale and the temperature are not decayed (CLIP/timm practice)
            (no_decay if p.ndim < 2 or "logit_scale" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def image_reader(data_cfg):
    """A PackedImages store when the recipe names one (``data.packed``), else None (decode files)."""
    if not data_cfg.packed:
        return None
    from .pack import PackedImages

    return PackedImages(data_cfg.packed)


def make_optimizer(module: nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; ``adamw8bit`` keeps its state in 8 bits (bitsandbytes)."""
    groups = _param_groups(module, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # the fused kernel: one pass over each tensor (CPU and CUDA); on the 2-core CPU it updates a
        # 21M-parameter text student in 0.023 s against 0.115 s for the default (foreach) one
        try:
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), fused=True)
        except (RuntimeError, ValueError):  # parameters of a device or dtype the kernel does not take
            return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise RecipeError("optim.optimizer: adamw8bit needs a CUDA GPU; use adamw on CPU")
        bnb = require("bitsandbytes", "optim.optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise RecipeError(f"optim.optimizer: {cfg.optimizer!r} is not one of adamw, adamw8bit")


def apply_memory_options(module: nn.Module, t) -> None:
    """Gradient checkpointing, channels_last and torch.compile on the trained towers (in place, so
    state-dict keys and checkpoints are unchanged)."""
    model = getattr(module, "student", None) or getattr(module, "model", None)
    if model is None:
        return
    if t.grad_checkpointing and not model.set_grad_checkpointing(True):
        log.warning("train.grad_checkpointing: no tower of this model supports it; ignored")
    if t.channels_last:
        model.to(memory_format=torch.channels_last)  # only 4-D (conv) weights change layout
    if t.compile:
        for tower in (model.image, model.text):
            if tower is not None:
                (tower.trunk if hasattr(tower, "trunk") else tower.encoder).compile()


class TrainLoop:
    """Runs ``max_steps`` optimiser steps of ``modules(batch) -> (loss, terms)``: the module's forward
    is the loss, so accelerate's DDP wrapper sees the whole step.

    Args:
        make_loader: ``(batches consumed, rank, world) -> batch iterator``.
        run: what this run is (``run_identity``): checkpoints are tied to it.
        skips: the run's SkipLog; ``rows`` the dataset's rows (batch ``skipped`` entries index them).
        hooks: called with the step number on the main process after each step.
        data_hint: what would make loading faster for this run (said once if loading is slow).
        inputs: ``{what: path}`` the run reads besides what its recipe names (image folders, a teacher
            object's folder): the output folder must not hold them where the run writes.
    """

    def __init__(self, recipe: Recipe, modules: nn.Module, make_loader: Callable[[int, int, int], Iterator],
                 run: dict[str, Any] | None = None, rows: Rows | None = None, skips: SkipLog | None = None,
                 images_per_batch: Callable[[dict[str, Any]], int] = lambda b: len(b["captions"]),
                 hooks: Sequence[Callable[[int], Any]] = (), data_hint: str = "",
                 inputs: dict[str, Any] | None = None):
        self.cfg = recipe
        self.inputs = {**recipe_inputs(recipe), **(inputs or {})}
        self.modules = modules
        self.make_loader = make_loader
        self.run_info = run or run_identity(recipe)
        self.rows, self.skips = rows, skips
        self.images_per_batch = images_per_batch
        self.hooks = hooks
        self.output_dir = Path(recipe.train.output_dir)
        self.resume_from: Path | None = None
        self._claimed = False
        self.data_hint = data_hint
        self.times = StepTimes()

    def claim(self) -> Path | None:
        """Check the output folder against this run (see ``claim_output_dir``); call before writing there.
        The main process decides and writes; every process gets its decision (or its error)."""
        if self._claimed:
            return self.resume_from
        t = self.cfg.train
        dist.state(cpu=t.cpu, timeout_s=t.dist_timeout)  # the process group, with the run's timeout
        outcome: tuple[str, str] = ("ok", "")
        if dist.is_main():
            try:
                found = claim_output_dir(self.output_dir, t, self.run_info, inputs=self.inputs)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                if found is not None:
                    step = int(read_json(found / "state.json")["step"])
                    for f in ("log.jsonl", "health.jsonl"):
                        _truncate_log(self.output_dir / f, step)
                write_json(self.output_dir / "run.json", {"id": _hash(self.run_info), "run": self.run_info})
                outcome = ("ok", str(found) if found is not None else "")
            except RunConflictError as e:
                outcome = ("conflict", str(e))
        outcome = dist.broadcast_object(outcome)
        if outcome[0] == "conflict":
            raise RunConflictError(outcome[1])
        self.resume_from = Path(outcome[1]) if outcome[1] else None
        self._claimed = True
        return self.resume_from

    def _accelerator(self):
        from accelerate import Accelerator

        t = self.cfg.train
        log_with = "tensorboard" if _has_tensorboard() else None
        from accelerate.utils import InitProcessGroupKwargs

        if resolve_precision(t.precision, t.cpu) == "fp16" and (t.cpu or not torch.cuda.is_available()):
            raise RecipeError("train.precision: fp16 needs a CUDA GPU (on a CPU it would silently train in fp32); "
                              "use bf16 or no here")
        dist.state(cpu=t.cpu, timeout_s=t.dist_timeout)
        return Accelerator(
            mixed_precision=resolve_precision(t.precision, t.cpu), gradient_accumulation_steps=t.grad_accum,
            cpu=t.cpu, log_with=log_with, project_dir=str(self.output_dir),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=t.dist_timeout))],
        )

    def run(self) -> tuple[dict[str, list[float]], int]:
        cfg, t = self.cfg, self.cfg.train
        resume_from = self.claim()
        seed_everything(t.seed)
        acc = self._accelerator()
        self.device = acc.device
        if acc.is_main_process:
            save_recipe(cfg, self.output_dir / "recipe.yaml")
        self.modules.to(acc.device)
        apply_memory_options(self.modules, t)
        optimizer = make_optimizer(self.modules, cfg.optim, acc.device)
        model, optimizer = acc.prepare(self.modules, optimizer)
        step, consumed, history = 0, 0, {"loss": []}
        ckpt_root = self.output_dir / "checkpoints"
        rid = _hash(self.run_info)
        if resume_from is not None:
            state = load_checkpoint(resume_from, acc.unwrap_model(model), optimizer, scaler=acc.scaler,
                                    extra=self.modules)
            step, consumed, history = state["step"], state["consumed"], state["history"]
            if state.get("max_steps") not in (None, t.max_steps):
                log.warning("train.max_steps is %d now, %d when the run started: the learning-rate schedule "
                            "follows the new value from here", t.max_steps, state["max_steps"])
            acc.print(f"resumed from {resume_from} (step {step})")
        if acc.log_with:
            acc.init_trackers("distill", config=_flat(cfg.to_dict()))
        loader = self.make_loader(consumed, acc.process_index, acc.num_processes)
        bar = _progress(t.max_steps, step, enabled=t.progress and acc.is_local_main_process)
        model.train()
        tic, seen, times, warned, first = time.perf_counter(), 0, self.times, False, step
        stage_no = -1
        while step < t.max_steps:
            total, terms_sum = 0.0, {}
            if t.schedule:
                stage_no = self._enter_stage(step, stage_no, acc, bar)
            for _ in range(t.grad_accum):
                with times("data"):
                    batch, n_batches = self._next_batch(loader)
                consumed += n_batches
                seen += self.images_per_batch(batch) * acc.num_processes
                with times("step"), acc.accumulate(model), acc.autocast():
                    loss, terms, error = self._forward(model, batch, step)
                    self._stop_together(error, loss, terms, step, ckpt_root)
                    acc.backward(loss)
                    if acc.sync_gradients:
                        for g in optimizer.param_groups:
                            g["lr"] = lr_at(step, cfg)
                        if cfg.optim.grad_clip > 0:
                            acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    # the loss of the whole global batch: the mean over processes (also the step's sync point)
                    values = dist.mean(torch.tensor([float(loss.detach()), *terms.values()], dtype=torch.float64,
                                                    device=dist.collective_device(acc.device)))
                total += float(values[0]) / t.grad_accum
                for k, v in zip(terms, values[1:].tolist()):
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / t.grad_accum
            step += 1
            with times("log"):
                wait = times.data_fraction()
                self._record(history, step, total, terms_sum, lr_at(step - 1, cfg), acc, wait, stage_no,
                             time.perf_counter() - tic)
                rate = seen / max(1e-9, time.perf_counter() - tic)
                bar.update(1)
                bar.set_postfix(loss=f"{total:.4f}", per_s=f"{rate:.0f}", wait=f"{wait:.0%}",
                                **({"stage": f"{stage_no + 1}/{len(t.schedule)}"} if t.schedule else {}))
                if step - first == 2:
                    times.reset_window()  # the first batches wait for the loader's start, not for its speed
                    times.mark(step - first)
                elif not warned and step - first >= 10:
                    warned = self._warn_if_slow(times.data_fraction(), acc)
                if step % t.log_every == 0 and step - first > 2:
                    times.reset_window()
            if acc.is_main_process:
                with times("hooks"):
                    for hook in self.hooks:
                        hook(step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                with times("checkpoint"):
                    acc.wait_for_everyone()
                    if acc.is_main_process:
                        save_checkpoint(ckpt_root, step, acc.unwrap_model(model), optimizer,
                                        {"consumed": consumed, "history": history, "run": rid,
                                         "max_steps": t.max_steps},
                                        keep=t.keep_checkpoints, scaler=acc.scaler, extra=self.modules)
                    acc.wait_for_everyone()  # no process runs ahead of a checkpoint being written
        bar.close()
        if acc.log_with:
            acc.end_training()
        self.samples_per_s = seen / max(1e-9, time.perf_counter() - tic)
        steady = times.steady()
        self.timing = {**{f"{k}_s": v for k, v in times.total.items()}, "steps": step - first,
                       "data_wait": times.data_fraction(window=False),
                       "steady": {**{f"{k}_s": v for k, v in steady.items()},
                                  "steps": step - first - times.start_steps}}
        self.is_main = acc.is_main_process
        if self.skips is not None and self.skips.count:
            log.warning(self.skips.summary())
        return history, step

    def _enter_stage(self, step: int, current: int, acc, bar) -> int:
        """Give the step module the stage of ``step`` (its token reduction) and say when a stage begins."""
        from .tokens import describe, stage_at, step_generator

        t = self.cfg.train
        index, stage = stage_at(t.schedule, step)
        self.modules.stage = stage
        self.modules.generator = step_generator(t.seed, step)
        if index != current:
            ends = sum(s.steps for s in t.schedule[:index + 1]) if index < len(t.schedule) - 1 else t.max_steps
            msg = f"stage {index + 1}/{len(t.schedule)} (steps {step + 1}-{ends}): {describe(stage)}"
            bar.set_description(f"train [stage {index + 1}]")
            if acc.is_main_process:
                bar.write(msg) if not bar.disable else log.info(msg)
        return index

    @staticmethod
    def _forward(model, batch, step: int):
        """(loss, terms, error): an error of this process is held until every process knows (a stop
        on one process alone would leave the others waiting in the next collective)."""
        try:
            loss, terms = model(batch)
            return loss, terms, None
        except Exception as e:  # noqa: BLE001: re-raised by _stop_together on every process
            return None, {}, e

    def _stop_together(self, error, loss, terms, step: int, ckpt_root: Path) -> None:
        """Stop every process when any process hit an error or a non-finite loss, with its message."""
        bad = error is not None or not bool(torch.isfinite(loss.detach()).all())
        if not dist.any_process(bad):
            return
        if error is not None:
            msg = f"{type(error).__name__}: {error}"
        elif bad:
            last = (list_checkpoints(ckpt_root) or ["none"])[-1]
            msg = (f"loss is {float(loss.detach())} at step {step + 1} (terms: {terms}); stopping. Last checkpoint: "
                   f"{last}. Try a lower optim.lr, optim.grad_clip > 0, or train.precision=no.")
        else:
            msg = ""
        reports = dist.gather_objects((dist.rank(), msg, error is not None))
        if error is not None:
            raise error  # this process's own error, with its type and traceback
        who, first, failed = next(r for r in reports if r[1])
        where = f" (process {who} of {dist.world()})" if dist.world() > 1 else ""
        if failed:
            from .errors import DistillError

            raise DistillError(f"stopped because another process failed{where}: {first}")
        raise NonFiniteLossError(first + where)

    def _next_batch(self, loader: Iterator) -> tuple[dict[str, Any], int]:
        """Next batch with rows; rows left out (unreadable images...) go to the SkipLog (of the main
        process, which hears of every process's)."""
        n = 0
        while True:
            batch = next(loader)
            n += 1
            skipped = list(batch.get("skipped", ()))
            if dist.world() > 1:
                skipped = [x for part in dist.gather_objects(skipped) for x in part]
            if self.skips is not None and self.rows is not None:
                for i, reason in skipped:
                    self.skips.add(self.rows, int(i), reason)
            if "index" in batch:
                return batch, n
            if n > 1000:
                from .errors import DataError

                raise DataError("1000 batches in a row had no usable rows; run `distill data check` on the data")

    def _warn_if_slow(self, fraction: float, acc) -> bool:
        """Say once that loading is the bottleneck, and what would fix it."""
        if fraction <= SLOW_DATA or not acc.is_main_process:
            return False
        workers = self.cfg.data.num_workers
        hints = [self.data_hint] if self.data_hint else []
        hints.append(f"more loader processes (data.num_workers={max(workers * 2, 2)}; now {workers})")
        log.warning("waiting for data takes %.0f%% of each step (over %.0f%%): the student waits for its inputs. "
                    "Try %s.", 100 * fraction, 100 * SLOW_DATA, " or ".join(hints))
        return True

    def _record(self, history, step, loss, terms, lr, acc, data_wait: float = 0.0, stage: int = -1,
                elapsed: float = 0.0) -> None:
        history["loss"].append(loss)
        history.setdefault("lr", []).append(lr)
        for k, v in terms.items():
            history.setdefault(k, []).append(v)
        if acc.log_with:
            acc.log({"loss": loss, "lr": lr, **terms, "data_wait": data_wait}, step=step)
        if acc.is_main_process and (step % self.cfg.train.log_every == 0 or step == 1):
            with open(self.output_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": lr, **terms, "data_wait": round(data_wait, 4),
                                    **({"stage": stage + 1} if stage >= 0 else {}),
                                    "elapsed_s": round(elapsed, 3)}) + "\n")


def _has_tensorboard() -> bool:
    from ._imports import is_available

    return is_available("tensorboard") or is_available("tensorboardX")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def make_loader_factory(dataset, collate, batch_size: int, seed: int, num_workers: int, pin: bool,
                        lengths: Sequence[int] | None = None):
    """Factory the loop calls with (batches already consumed, rank, world) -> batch iterator;
    ``lengths``: each row's token count, to batch rows of similar length (``data.group_by_length``)."""

    def make(consumed: int, rank: int, world: int) -> Iterator:
        batches = EpochBatchSampler(len(dataset), batch_size * world, seed, lengths=lengths)
        sampler = _RankSampler(batches, consumed, rank, world)
        # its own generator: a DataLoader iterator otherwise draws its workers' base seed from the global
        # one, which a resumed run has just restored, and every dropout mask after the resume would shift
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            pin_memory=pin, persistent_workers=False, generator=torch.Generator().manual_seed(seed),
        )
        return iter(loader)

    return make


class _RankSampler(torch.utils.data.Sampler):
    """Process ``rank`` of ``world`` takes its slice of each global batch (``world`` x the micro-batch),
    starting after ``consumed`` batches: N processes at micro-batch B see, step by step, exactly the
    rows one process sees at N*B."""

    def __init__(self, base: EpochBatchSampler, consumed: int, rank: int, world: int):
        self.base, self.consumed, self.rank, self.world = base, consumed, rank, world

    def __iter__(self):
        self.base.start_batch = self.consumed
        for batch in self.base:
            per = -(-len(batch) // self.world)
            yield batch[self.rank * per:(self.rank + 1) * per]

    def __len__(self) -> int:
        return len(self.base)
