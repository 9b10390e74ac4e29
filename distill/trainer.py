"""The training loop (accelerate) and the Distiller.

``TrainLoop`` owns what every run shares: optimiser, warm-up + cosine schedule,
gradient accumulation and clipping, mixed precision, checkpoints, resume, logs and the
NaN guard. ``Distiller`` plugs a frozen teacher, a student and the weighted losses into it.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from ._imports import require
from .checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from .config import Recipe, apply_options, save_recipe
from .data import EpochBatchSampler, PairDataset, Rows, as_rows, make_collate
from .losses import DistillLoss, Embeddings
from .transforms import normalize

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step."""


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


def _precision(requested: str, cpu: bool) -> str:
    if requested != "auto":
        return requested
    if not cpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


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
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    if cfg.optimizer == "adamw8bit":
        if device.type != "cuda":
            raise ValueError("optim.optimizer=adamw8bit needs a CUDA GPU; use adamw on CPU")
        bnb = require("bitsandbytes", "optim.optimizer=adamw8bit")
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas))
    raise ValueError(f"optim.optimizer: {cfg.optimizer!r} is not one of adamw, adamw8bit")


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
    is the loss, so accelerate's DDP wrapper sees the whole step."""

    def __init__(
        self,
        recipe: Recipe,
        modules: nn.Module,
        make_loader: Callable[[int, int, int], Iterator],
        images_per_batch: Callable[[dict[str, Any]], int] = lambda b: len(b["captions"]),
        hooks: Sequence[Callable[[int], Any]] = (),
    ):
        self.cfg = recipe
        self.modules = modules
        self.make_loader = make_loader
        self.images_per_batch = images_per_batch
        self.hooks = hooks  # called with the step number on the main process after each step
        self.output_dir = Path(recipe.train.output_dir)

    def _accelerator(self):
        from accelerate import Accelerator

        t = self.cfg.train
        log_with = "tensorboard" if _has_tensorboard() else None
        return Accelerator(
            mixed_precision=_precision(t.precision, t.cpu), gradient_accumulation_steps=t.grad_accum,
            cpu=t.cpu, log_with=log_with, project_dir=str(self.output_dir),
        )

    def run(self) -> tuple[dict[str, list[float]], int]:
        cfg, t = self.cfg, self.cfg.train
        seed_everything(t.seed)
        acc = self._accelerator()
        self.device = acc.device
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if acc.is_main_process:
            save_recipe(cfg, self.output_dir / "recipe.yaml")
        self.modules.to(acc.device)
        apply_memory_options(self.modules, t)
        optimizer = make_optimizer(self.modules, cfg.optim, acc.device)
        model, optimizer = acc.prepare(self.modules, optimizer)
        step, consumed, history = 0, 0, {"loss": []}
        ckpt_root = self.output_dir / "checkpoints"
        if t.resume and list_checkpoints(ckpt_root):
            last = list_checkpoints(ckpt_root)[-1]
            state = load_checkpoint(last, acc.unwrap_model(model), optimizer)
            step, consumed, history = state["step"], state["consumed"], state["history"]
            acc.print(f"resumed from {last} (step {step})")
        if acc.log_with:
            acc.init_trackers("distill", config=_flat(cfg.to_dict()))
        loader = self.make_loader(consumed, acc.process_index, acc.num_processes)
        bar = _progress(t.max_steps, step, enabled=t.progress and acc.is_local_main_process)
        model.train()
        tic, seen = time.perf_counter(), 0
        while step < t.max_steps:
            total, terms_sum = 0.0, {}
            for _ in range(t.grad_accum):
                batch, n_batches = _next_batch(loader)
                consumed += n_batches
                seen += self.images_per_batch(batch)
                with acc.accumulate(model), acc.autocast():
                    loss, terms = model(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(
                            f"loss is {float(loss.detach())} at step {step + 1} (terms: {terms}); stopping. "
                            f"Last checkpoint: {(list_checkpoints(ckpt_root) or ['none'])[-1]}. "
                            "Try a lower optim.lr, optim.grad_clip > 0, or train.precision=no.")
                    acc.backward(loss)
                    if acc.sync_gradients:
                        for g in optimizer.param_groups:
                            g["lr"] = lr_at(step, cfg)
                        if cfg.optim.grad_clip > 0:
                            acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                total += float(loss.detach()) / t.grad_accum
                for k, v in terms.items():
                    terms_sum[k] = terms_sum.get(k, 0.0) + v / t.grad_accum
            step += 1
            self._record(history, step, total, terms_sum, lr_at(step - 1, cfg), acc)
            rate = seen / max(1e-9, time.perf_counter() - tic)
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", per_s=f"{rate:.0f}")
            if acc.is_main_process:
                for hook in self.hooks:
                    hook(step)
            if (t.checkpoint_every and step % t.checkpoint_every == 0) or step == t.max_steps:
                acc.wait_for_everyone()
                if acc.is_main_process:
                    save_checkpoint(ckpt_root, step, acc.unwrap_model(model), optimizer,
                                    {"consumed": consumed, "history": history}, keep=t.keep_checkpoints)
        bar.close()
        if acc.log_with:
            acc.end_training()
        self.samples_per_s = seen / max(1e-9, time.perf_counter() - tic)
        self.is_main = acc.is_main_process
        return history, step

    def _record(self, history, step, loss, terms, lr, acc) -> None:
        history["loss"].append(loss)
        history.setdefault("lr", []).append(lr)
        for k, v in terms.items():
            history.setdefault(k, []).append(v)
        if acc.log_with:
            acc.log({"loss": loss, "lr": lr, **terms}, step=step)
        if acc.is_main_process and (step % self.cfg.train.log_every == 0 or step == 1):
            with open(self.output_dir / "log.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "loss": loss, "lr": lr, **terms}) + "\n")


def _next_batch(loader: Iterator) -> tuple[dict[str, Any], int]:
    """Next non-empty batch; a batch whose every row was unreadable is skipped (and counted)."""
    n = 0
    while True:
        batch = next(loader)
        n += 1
        if batch is not None:
            return batch, n
        if n > 1000:
            raise RuntimeError("1000 batches in a row had no readable rows; check the data")


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


def make_loader_factory(dataset, collate, batch_size: int, seed: int, num_workers: int, pin: bool):
    """Factory the loop calls with (batches already consumed, rank, world) -> batch iterator."""

    def make(consumed: int, rank: int, world: int) -> Iterator:
        sampler = _RankSampler(EpochBatchSampler(len(dataset), batch_size, seed), consumed, rank, world)
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
            pin_memory=pin, persistent_workers=False,
        )
        return iter(loader)

    return make


class _RankSampler(torch.utils.data.Sampler):
    """Process ``rank`` of ``world`` takes every world-th batch, starting after ``consumed`` of its own."""

    def __init__(self, base: EpochBatchSampler, consumed: int, rank: int, world: int):
        self.base, self.consumed, self.rank, self.world = base, consumed, rank, world

    def __iter__(self):
        self.base.start_batch = self.consumed * self.world
        for k, batch in enumerate(self.base):
            if k % self.world == self.rank:
                yield batch

    def __len__(self) -> int:
        return len(self.base)


class Distiller:
    """Distil a frozen teacher into a student.

    Args:
        teacher: a Teacher, a name for :func:`distill.load_teacher`, a ``TeacherService`` (its cache is
            used, and extended with rows it lacks), or None with ``cache=DIR`` (training reads the cache only).
        student: a Student, or a name for :func:`distill.create_student` (projected to the
            teacher's ``embed_dim``).
        recipe: a Recipe (``distill.config.load_recipe``); options override it.
        **options: recipe fields by name: ``output_dir``, ``batch_size``, ``max_steps``, ``lr``,
            ``image_size``, ``seed``, ``loss_weights``, ``grad_accum``, ``precision``, ``resume``,
            ``cache`` (an embedding cache folder), ``allow_stale``, ...

    Example:
        >>> result = Distiller(teacher, student, max_steps=500, output_dir="runs/x").fit("data.csv")
        >>> result.history["loss"][-1]
    """

    def __init__(self, teacher: Any = None, student: Any = None, *, recipe: Recipe | None = None, **options: Any):
        self.recipe = apply_options(recipe or Recipe(), options)
        self._teacher, self._student = teacher, student

    def build(self):
        """Resolve teacher, student and cache (loading/creating them by name from the recipe if needed).

        With a complete cache and no teacher object the teacher is not loaded at all: training reads
        the cache. A teacher that is given is checked against the cache's manifest."""
        from .cache import EmbeddingCache, TeacherService
        from .students import create_student

        r = self.recipe
        teacher, self._service = self._teacher, None
        if isinstance(teacher, TeacherService):
            self._service, teacher = teacher, teacher.teacher
        self.cache_dir = r.cache.dir or (str(self._service.dir) if self._service else None)
        cache = None
        if self.cache_dir and (Path(self.cache_dir) / "manifest.json").exists():
            cache = EmbeddingCache.open(self.cache_dir)
        self._cache = cache  # opened once; reopened only after cache-through writes to it
        if teacher is None and cache is None:
            teacher = r.teacher.name
        if isinstance(teacher, str):
            teacher = self._load_teacher(teacher)
        if cache is not None:
            cache.check(teacher, allow_stale=r.cache.allow_stale)
        embed_dim = teacher.embed_dim if teacher is not None else cache.embed_dim
        student = self._student if self._student is not None else r.student.name
        if isinstance(student, str):
            kwargs = dict(r.student.kwargs)
            if r.data.image_size is not None and "+" not in student:
                kwargs.setdefault("image_size", r.data.image_size)
            student = create_student(student, embed_dim=embed_dim, **kwargs)
        if student.embed_dim != embed_dim:
            raise ValueError(f"student embed_dim {student.embed_dim} != teacher embed_dim {embed_dim}")
        _check_image_size(student, r.data.image_size)
        self._teacher, self._student = teacher, student
        return teacher, student

    def _load_teacher(self, name: str):
        from .teachers import load_teacher

        r = self.recipe
        return load_teacher(name, pretrained=r.teacher.pretrained, **r.teacher.kwargs)

    def _prepare_cache(self, rows: Rows, teacher):
        """Open the cache, encode the rows it lacks when a teacher is at hand ("cache-through"),
        and return (cache, rows, image keys, text keys) for the rows it holds."""
        from .cache import EmbeddingCache, TeacherService, row_keys

        r, path, cache = self.recipe, Path(self.cache_dir), self._cache
        keys = row_keys(rows, cache) if cache is not None else None
        missing = keys[2] if keys is not None else list(range(len(rows)))
        if missing:
            if teacher is None:
                teacher = self._load_teacher(self.recipe.teacher.name)
                if cache is not None:
                    cache.check(teacher, allow_stale=r.cache.allow_stale)
            policy = cache.manifest["view_policy"] if cache is not None else {
                "views": r.cache.views, "seed": r.train.seed, "scale": [0.35, 1.0], "ratio": [3 / 4, 4 / 3]}
            service = self._service or TeacherService(
                teacher, path, dtype=cache.manifest["dtype"] if cache else r.cache.dtype,
                num_workers=r.data.num_workers, progress=r.train.progress, reader=image_reader(r.data))
            service.build(rows.subset(missing), views=policy["views"], seed=policy["seed"],
                          scale=policy["scale"], ratio=policy["ratio"])
            cache = self._cache = EmbeddingCache.open(path)
            keys = row_keys(rows, cache)
        image_keys, text_keys, missing = keys
        if missing:  # unreadable images / empty captions the build skipped (skipped.jsonl says why)
            log.warning("%d of %d rows have no cached teacher embedding and are left out (see %s)",
                        len(missing), len(rows), path / "skipped.jsonl")
            keep = sorted(set(range(len(rows))) - set(missing))
            rows = rows.subset(keep)
            image_keys, text_keys = [image_keys[i] for i in keep], [text_keys[i] for i in keep]
        return cache, rows, image_keys, text_keys

    def fit(self, data: Any = None) -> FitResult:
        """Train; ``data``: a file/folder path or Rows (default: the recipe's ``data.train``)."""
        r = self.recipe
        teacher, student = self.build()
        source = data if data is not None else r.data.train
        if not source:
            raise ValueError("no training data: pass fit(data) or set data.train")
        rows = as_rows(source, image_column=r.data.image_column, caption_column=r.data.caption_column)
        if student.image is not None and not rows.has_images:
            raise ValueError(f"{rows.source}: the student has an image tower but the data has no images")
        if student.image is None and not rows.has_text:
            raise ValueError(f"{rows.source}: the student is text-only but the data has no captions")
        rows, held = self._hold_out(rows)
        if self.cache_dir:
            dataset, collate, identity = self._cached_data(rows, teacher, student)
            health = self._health(held, teacher, student)  # before the teacher is dropped
            teacher = None  # training reads the cache; the teacher is not needed (nor kept on the GPU)
        else:
            dataset, collate = self._online_data(rows, teacher, student)
            identity = teacher.identity
            health = self._health(held, teacher, student)
        step_module = DistillStep(teacher, student, DistillLoss(r.loss.weights, r.loss.kwargs))
        pin = torch.cuda.is_available() and not r.train.cpu
        workers = r.data.num_workers if rows.has_images else 0
        hooks = [lambda step: health(student, step) if step % r.train.health_every == 0 else None] if health else []
        loop = TrainLoop(r, step_module,
                         make_loader_factory(dataset, collate, r.train.batch_size, r.train.seed, workers, pin),
                         hooks=hooks)
        history, steps = loop.run()
        student.teacher_identity = identity
        out = Path(r.train.output_dir)
        student_dir = out / "student"
        if loop.is_main:
            student.cpu().eval().save(student_dir)
        return FitResult(out, history, student, student_dir, steps, {"samples_per_s": loop.samples_per_s})

    def _hold_out(self, rows: Rows) -> tuple[Rows, Rows | None]:
        """Set aside a slice of whole images for the health checks (none for small or text-only data)."""
        from .health import hold_out

        t = self.recipe.train
        n_images = len({i for i in rows.images if i})
        size = min(t.health_rows, n_images // 10)
        if t.health_every <= 0 or size < 32 or not rows.has_text:
            return rows, None
        train, held = hold_out(rows, size, t.seed)
        return rows.subset(train), rows.subset(held)

    def _health(self, held: Rows | None, teacher, student):
        """A HealthCheck with the teacher's embeddings of the held-out slice (from the cache when
        training from one); it warns about the teacher itself right away."""
        if held is None:
            return None
        from .eval import caption_pairs, embed_images, embed_texts
        from .health import HealthCheck

        if self.cache_dir:
            cache, held, image_keys, text_keys = self._prepare_cache(held, teacher)
            images, texts, _ = caption_pairs(held)
            key_of_image, key_of_text = dict(zip(held.images, image_keys)), dict(zip(held.captions, text_keys))
            t_img = cache.image_embeddings([key_of_image[p] for p in images], [0] * len(images))
            t_txt = cache.text_embeddings([key_of_text[c] for c in texts])
        else:
            images, texts, _ = caption_pairs(held)
            t_img = embed_images(teacher, images) if teacher.has_image else None
            t_txt = embed_texts(teacher, texts) if teacher.has_text else None
        check = HealthCheck(held, t_img, t_txt, warmup_steps=max(self.recipe.optim.warmup_steps, 1),
                            out_file=Path(self.recipe.train.output_dir) / "health.jsonl")
        Path(self.recipe.train.output_dir).mkdir(parents=True, exist_ok=True)
        check.report(0, check.teacher_alarms())
        return check

    def _online_data(self, rows: Rows, teacher, student):
        r = self.recipe
        use_images = rows.has_images and (student.image is not None or teacher.has_image)
        views = {}
        if use_images and student.image is not None:
            views["student"] = student.preprocess
        if use_images and teacher.has_image:
            views["teacher"] = teacher.preprocess
        tokenizers = {}
        if rows.has_text and teacher.has_text:
            tokenizers["teacher"] = teacher.tokenize
            if student.text is not None:
                tokenizers["student"] = student.tokenize
        dataset = PairDataset(rows, views, r.data.augment, r.data.crop_scale, r.train.seed, image_reader(r.data))
        return dataset, make_collate(tokenizers)

    def _cached_data(self, rows: Rows, teacher, student):
        from .cache import CachedPairDataset, cached_collate

        r = self.recipe
        cache, rows, image_keys, text_keys = self._prepare_cache(rows, teacher)
        dataset = CachedPairDataset(rows, image_keys, text_keys, cache,
                                    student.preprocess if student.image is not None else None,
                                    r.data.augment, r.train.seed, image_reader(r.data))
        tokenizers = {"student": student.tokenize} if student.text is not None and rows.has_text else {}
        return dataset, cached_collate(cache, make_collate(tokenizers)), cache.manifest["teacher"]


class DistillStep(nn.Module):
    """Student + losses as one module whose forward is the loss, so that a DDP-wrapped copy
    synchronises gradients; the frozen teacher is held outside the module's parameters."""

    def __init__(self, teacher, student, loss: DistillLoss):
        super().__init__()
        self.student = student
        self.loss = loss
        self._teacher = [teacher]  # a list: not registered, never trained or checkpointed

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.loss_device
        pre = {"student": self.student.preprocess, "teacher": getattr(self._teacher[0], "preprocess", None)}
        pix = {k: normalize(v.to(dev, non_blocking=True), pre[k]) for k, v in batch.get("views", {}).items()}
        e = Embeddings()
        if "teacher_emb" in batch:  # read from the cache
            cached = {k: v.to(dev, non_blocking=True) for k, v in batch["teacher_emb"].items()}
            e.t_img, e.t_txt = cached.get("image"), cached.get("text")
        else:
            t = self._teacher[0]
            if t.device != dev:
                t.to(dev)
            if "teacher" in pix:
                e.t_img = t.encode_image(pix["teacher"])
            if "teacher" in batch["tokens"]:
                e.t_txt = t.encode_text(batch["tokens"]["teacher"])
        if "student" in pix:
            e.s_img = self.student.image_features(pix["student"])
        if "student" in batch["tokens"]:
            e.s_txt = self.student.text_features(batch["tokens"]["student"])
        return self.loss(e)

    @property
    def loss_device(self) -> torch.device:
        return next(self.student.parameters()).device


def _check_image_size(student, image_size: int | None) -> None:
    if image_size is None or student.image is None or student.preprocess.image_size == image_size:
        return
    pe = getattr(student.image.trunk, "patch_embed", None)
    fixed = getattr(pe, "img_size", None)
    if fixed is not None and not getattr(pe, "dynamic_img_size", False) and tuple(fixed)[-1] != image_size:
        raise ValueError(f"image_size={image_size}: this ViT student was built for {tuple(fixed)[-1]} px; "
                         f"create it with create_student(..., image_size={image_size})")
    p = student.image.preprocess
    from .transforms import PreprocessCfg

    student.image.preprocess = PreprocessCfg(image_size, p.mean, p.std, p.interpolation, p.resize_mode)
