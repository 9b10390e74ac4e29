"""Contrastive tuning of a two-tower model (CLIP loss, learnable temperature), with a tower
optionally locked: ``lock="text"`` is LiT (Zhai et al., 2022), ``lock="image"`` trains a text
tower into a frozen image space. The result is a folder ``load_teacher`` loads."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import Recipe, apply_options
from .data import PairDataset, as_rows, make_collate
from .losses import clip_loss
from .trainer import FitResult, TrainLoop, make_loader_factory

LOCKS = ("none", "text", "image")


class _Temperature(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init)))


class TuneStep(nn.Module):
    """Two-tower model + temperature; forward is the CLIP loss (one module for DDP)."""

    def __init__(self, model, temperature: _Temperature, lock: str):
        super().__init__()
        self.model = model
        self.loss = temperature
        self.lock = lock

    def forward(self, batch):
        model, lock = self.model, self.lock
        frozen = {"text": model.text, "image": model.image}.get(lock)
        if frozen is not None:
            frozen.eval()  # no dropout / statistics updates in the locked tower
        pix = batch["views"]["model"].to(self.loss.logit_scale.device, non_blocking=True)
        with torch.set_grad_enabled(lock != "image"):
            img = model.image_features(pix)
        with torch.set_grad_enabled(lock != "text"):
            txt = model.text_features(batch["tokens"]["model"])
        loss = clip_loss(img, txt, self.loss.logit_scale)
        return loss, {"clip": float(loss.detach()), "temperature": float(1 / self.loss.logit_scale.detach().exp())}


class Tuner:
    """Train a two-tower Student contrastively on image-caption pairs.

    Args:
        model: a two-tower Student (``create_student("vit_tiny+bert_small", embed_dim=256)``).
        recipe: a Recipe; ``options`` (``lock``, ``lr``, ``max_steps``, ``output_dir``, ...) override it.
    """

    def __init__(self, model: Any, *, recipe: Recipe | None = None, **options: Any):
        self.recipe = apply_options(recipe or Recipe(), options)
        if self.recipe.tune.lock not in LOCKS:
            raise ValueError(f"tune.lock: {self.recipe.tune.lock!r} is not one of {LOCKS}")
        if model.image is None or model.text is None:
            raise ValueError("Tuner needs a two-tower model (an image and a text tower)")
        self.model = model

    def fit(self, data: Any = None) -> FitResult:
        r, model = self.recipe, self.model
        rows = as_rows(data if data is not None else r.data.train,
                       image_column=r.data.image_column, caption_column=r.data.caption_column)
        lock = r.tune.lock
        frozen = {"text": model.text, "image": model.image}.get(lock)
        if frozen is not None:
            frozen.requires_grad_(False)
        dataset = PairDataset(rows, {"model": model.preprocess}, r.data.augment, r.data.crop_scale, r.train.seed)
        collate = make_collate({"model": model.tokenize})
        step_module = TuneStep(model, _Temperature(r.tune.init_temperature), lock)

        pin = torch.cuda.is_available() and not r.train.cpu
        loop = TrainLoop(r, step_module,
                         make_loader_factory(dataset, collate, r.train.batch_size, r.train.seed, r.data.num_workers, pin))
        history, steps = loop.run()
        model_dir = Path(r.train.output_dir) / "model"
        if loop.is_main:
            model.cpu().eval().save(model_dir)
        return FitResult(model_dir.parent, history, model, model_dir, steps, {"samples_per_s": loop.samples_per_s})
