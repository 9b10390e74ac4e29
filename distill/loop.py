"""The training loop every run shares (distillation, tuning), through accelerate, and the step it repeats.

``train_step`` is one optimiser micro-step of a step module (its forward is the loss), callable on its own;
``TrainLoop`` owns the rest: the output folder (``run.claim_output_dir``), warm-up + cosine schedule,
accumulation, mixed precision, checkpoints and resume, logs, skipped rows, the NaN guard and stopping every
process together.
"""
from __future__ import annotations

import datetime
import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from . import dist
from ._compat import forward
from .checkpoint import list_checkpoints, load_checkpoint, rng_state, save_checkpoint
from .config import Recipe, save_recipe
from .data import Rows
from .errors import NonFiniteLossError, RecipeError
from .io import read_json, write_json
from .optim import apply_memory_options, lr_at, make_optimizer, seed_everything
from .precision import resolve_precision
from .progress import progress
from .run import (FitResult, SkipLog, StepTimes, _hash, _truncate_log, claim_output_dir, recipe_inputs,  # noqa: F401
                  run_identity)

log = logging.getLogger(__name__)


SLOW_DATA = 0.25  # warn once when waiting for data takes more than this share of the step time


class _OneProcess:
    """What ``train_step`` asks of an accelerate ``Accelerator``, for a plain step without one."""

    sync_gradients = True

    def accumulate(self, model: nn.Module):
        return nullcontext()

    def autocast(self):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float):
        return torch.nn.utils.clip_grad_norm_(list(params), max_norm)


def train_step(model: nn.Module, batch: Any, optimizer: torch.optim.Optimizer, lr: float, grad_clip: float = 0.0,
               accelerator: Any = None, check: Callable[[torch.Tensor, dict], None] | None = None,
               stop: Callable[[str], Any] | None = None):
    """One micro-step of a step module: forward (``model.embed(batch)`` on this process's rows, then
    ``model.loss_of(...)``, whose gathers see every process's; a module with only ``forward`` is called
    whole), backward, and at the end of an accumulation window the gradient average over processes, the
    learning rate, clipping and the optimiser step. ``accelerator``: accelerate's (mixed precision,
    accumulation), or None for a plain step. ``check(loss, terms)`` may refuse the loss (a NaN).
    ``stop(what)``: ``dist.stop_together`` under several processes: each region that can fail on one
    process ends in a status check, so no process enters a collective another one will never reach.
    Returns the loss (detached) and its terms."""
    acc, stop = accelerator or _OneProcess(), stop or (lambda what: nullcontext())
    with acc.accumulate(model), acc.autocast():
        with stop("in the forward pass"):
            parts = model.embed(batch) if hasattr(model, "embed") else None
        loss, terms = model.loss_of(parts) if parts is not None else model(batch)
        with stop("with its loss"):
            if check is not None:
                check(loss, terms)
        with stop("in the backward pass"):
            acc.backward(loss)
        if acc.sync_gradients:
            dist.average_gradients([p for p in model.parameters() if p.requires_grad])
            with stop("in the optimiser step"):
                for group in optimizer.param_groups:
                    group["lr"] = lr
                if grad_clip > 0:
                    acc.clip_grad_norm_(model.parameters(), grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return loss.detach(), terms


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
        found = None
        with dist.stop_together("while claiming the output folder"):
            if dist.is_main():
                found = claim_output_dir(self.output_dir, t, self.run_info, inputs=self.inputs)
                self.output_dir.mkdir(parents=True, exist_ok=True)
                if found is not None:
                    step = int(read_json(found / "state.json")["step"])
                    for f in ("log.jsonl", "health.jsonl"):
                        _truncate_log(self.output_dir / f, step)
                write_json(self.output_dir / "run.json", {"id": _hash(self.run_info), "run": self.run_info})
        found = dist.broadcast_object(str(found) if found is not None else "", "the output folder's decision")
        self.resume_from = Path(found) if found else None
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
        seed_everything(t.seed + dist.rank())  # each process its own dropout masks (and its own state in checkpoints)
        acc = self._accelerator()
        self.device = acc.device
        if acc.is_main_process:
            save_recipe(cfg, self.output_dir / "recipe.yaml")
        # not wrapped in DDP: the gradient average runs after every process's backward (train_step), so a
        # failure on one process is known to all before any of them enters that collective
        model = self.modules.to(acc.device)
        apply_memory_options(model, t)
        dist.broadcast_module(model)  # every process starts from the main process's weights, as DDP would
        optimizer = acc.prepare(make_optimizer(model, cfg.optim, acc.device))
        step, consumed, history = 0, 0, {"loss": []}
        if resume_from is not None:
            step, consumed, history = self._resume(resume_from, acc, model, optimizer)
        if acc.log_with:
            acc.init_trackers("distill", config=_flat(cfg.to_dict()))
        loader = self.make_loader(consumed, acc.process_index, acc.num_processes)
        bar = progress(t.max_steps, "train", "step", initial=step, enabled=t.progress and acc.is_local_main_process)
        model.train()
        self.tic, self.seen, self.first, self.warned, stage_no = time.perf_counter(), 0, step, False, -1
        while step < t.max_steps:
            if t.schedule:
                stage_no = self._enter_stage(step, stage_no, acc, bar)
            total, terms_sum = 0.0, {}
            for _ in range(t.grad_accum):
                with self.times("data"):
                    batch, n_batches = self._next_batch(loader)
                consumed += n_batches
                self.seen += self.images_per_batch(batch) * acc.num_processes
                with self.times("step"):
                    loss, terms = train_step(model, batch, optimizer, lr_at(step, cfg), cfg.optim.grad_clip, acc,
                                             check=lambda loss, terms: self._check_loss(loss, terms, step),
                                             stop=dist.stop_together)
                    # the loss of the whole global batch: the mean over processes (also the step's sync point)
                    values = dist.mean(torch.tensor([float(loss), *terms.values()], dtype=torch.float64,
                                                    device=dist.collective_device(acc.device)))
                total += float(values[0]) / t.grad_accum
                for k, v in zip(terms, values[1:].tolist()):
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / t.grad_accum
            step += 1
            self._after_step(step, history, total, terms_sum, stage_no, acc, bar)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                self._checkpoint(step, consumed, history, acc, model, optimizer)
        bar.close()
        if acc.log_with:
            acc.end_training()
        self._finish(step, acc)
        return history, step

    def _resume(self, path: Path, acc, model, optimizer) -> tuple[int, int, dict[str, list[float]]]:
        state = load_checkpoint(path, model, optimizer, scaler=acc.scaler, extra=self.modules, rank=dist.rank())
        if state.get("max_steps") not in (None, self.cfg.train.max_steps):
            log.warning("train.max_steps is %d now, %d when the run started: the learning-rate schedule "
                        "follows the new value from here", self.cfg.train.max_steps, state["max_steps"])
        acc.print(f"resumed from {path} (step {state['step']})")
        return state["step"], state["consumed"], state["history"]

    def _after_step(self, step: int, history, total: float, terms: dict[str, float], stage_no: int, acc, bar) -> None:
        """Log the step (history, log.jsonl, trackers, the progress report) and run the hooks."""
        t, times = self.cfg.train, self.times
        with times("log"):
            wait = times.data_fraction()
            elapsed = time.perf_counter() - self.tic
            self._record(history, step, total, terms, lr_at(step - 1, self.cfg), acc, wait, stage_no, elapsed)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", per_s=f"{self.seen / max(1e-9, elapsed):.0f}", wait=f"{wait:.0%}",
                            **({"stage": f"{stage_no + 1}/{len(t.schedule)}"} if t.schedule else {}))
            if step - self.first == 2:
                times.reset_window()  # the first batches wait for the loader's start, not for its speed
                times.mark(step - self.first)
            elif not self.warned and step - self.first >= 10:
                self.warned = self._warn_if_slow(times.data_fraction(), acc)
            if step % t.log_every == 0 and step - self.first > 2:
                times.reset_window()
        with times("hooks"), dist.stop_together(f"in a hook after step {step}"):
            if acc.is_main_process:
                for hook in self.hooks:
                    hook(step)

    def _checkpoint(self, step: int, consumed: int, history, acc, model, optimizer) -> None:
        """The main process writes the checkpoint (every process's RNG in it); no process runs ahead of it, and
        a write that fails (a full disk) stops every process, leaving no half-written checkpoint."""
        t = self.cfg.train
        with self.times("checkpoint"):
            rngs = dist.gather_objects(rng_state(), "the gather of every process's random state")
            with dist.stop_together(f"while writing the checkpoint of step {step}"):
                if acc.is_main_process:
                    save_checkpoint(self.output_dir / "checkpoints", step, model, optimizer,
                                    {"consumed": consumed, "history": history, "run": _hash(self.run_info),
                                     "max_steps": t.max_steps},
                                    keep=t.keep_checkpoints, scaler=acc.scaler, extra=self.modules, rngs=rngs)

    def _finish(self, step: int, acc) -> None:
        times = self.times
        self.samples_per_s = self.seen / max(1e-9, time.perf_counter() - self.tic)
        steady = times.steady()
        self.timing = {**{f"{k}_s": v for k, v in times.total.items()}, "steps": step - self.first,
                       "data_wait": times.data_fraction(window=False),
                       "steady": {**{f"{k}_s": v for k, v in steady.items()},
                                  "steps": step - self.first - times.start_steps}}
        self.is_main = acc.is_main_process
        if self.skips is not None and self.skips.count:
            log.warning(self.skips.summary())

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

    def _check_loss(self, loss: torch.Tensor, terms: dict[str, float], step: int) -> None:
        """A non-finite loss stops the run (every process, through ``train_step``'s status check)."""
        if not bool(torch.isfinite(loss.detach()).all()):
            last = (list_checkpoints(self.output_dir / "checkpoints") or ["none"])[-1]
            raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step + 1} (terms: {terms}); stopping. "
                                     f"Last checkpoint: {last}. Try a lower optim.lr, optim.grad_clip > 0, or "
                                     "train.precision=no.")

    def _next_batch(self, loader: Iterator) -> tuple[dict[str, Any], int]:
        """Next batch with rows on every process. Each process fetches once per round and every process joins
        the round's one gather (the rows each left out, for the SkipLog, and whether it has rows), so the
        collectives and the batch counts stay in step whatever the data: a round where any process has no
        usable row is fetched again by all."""
        n = 0
        while True:
            with dist.stop_together("reading its next batch"):
                batch = next(loader)
            n += 1
            reports = dist.gather_objects((list(batch.get("skipped", ())), "index" in batch), "the batch status")
            if self.skips is not None and self.rows is not None:
                for skipped, _ in reports:
                    for i, reason in skipped:
                        self.skips.add(self.rows, int(i), reason)
            if all(has_rows for _, has_rows in reports):
                return batch, n
            if n > 1000:
                from .errors import DataError

                raise DataError("1000 batches in a row had no usable rows on some process; run `distill data check` "
                                "on the data")

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




__getattr__ = forward(__name__, {  # moved: importable from here for one more release
    "data_fingerprint": "distill.run:data_fingerprint", "_with_defaults": "distill.run:_with_defaults",
    "check_output_dir": "distill.run:check_output_dir", "run_inputs": "distill.run:run_inputs",
    "RUN_FILES": "distill.run:RUN_FILES", "make_loader_factory": "distill.data.sampler:make_loader_factory",
    "image_reader": "distill.data.packed:image_reader"})
