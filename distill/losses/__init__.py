"""Distillation losses: pure tensor modules, built by name and summed with weights (``terms``).

``LOSSES`` names them without importing torch (a recipe's loss names are checked when it is read); the
classes load when first used. A new loss is a class in any module and one ``LOSSES.register_lazy`` line
(or ``LOSSES.register`` of its entrypoint).
"""
from __future__ import annotations

import importlib
from typing import Any

from ..registry import Registry

LOSSES = Registry("loss")
LOSSES.register_lazy("cosine", "distill.losses.terms:CosineLoss", kind="regression")
LOSSES.register_lazy("mse", "distill.losses.terms:MSELoss", kind="regression")
LOSSES.register_lazy("smooth_l1", "distill.losses.terms:SmoothL1Loss", kind="regression")
LOSSES.register_lazy("contrastive", "distill.losses.terms:ContrastiveLoss", kind="contrastive")
LOSSES.register_lazy("affinity", "distill.losses.terms:AffinityLoss", kind="contrastive")

_TERMS = ("Embeddings", "CosineLoss", "MSELoss", "SmoothL1Loss", "ContrastiveLoss", "AffinityLoss", "DistillLoss",
          "EmbeddingQueue", "info_nce", "clip_loss", "same_target", "full_precision", "create_loss")


def __getattr__(name: str) -> Any:
    if name in _TERMS:
        return getattr(importlib.import_module("distill.losses.terms"), name)
    raise AttributeError(f"module 'distill.losses' has no attribute {name!r}")


__all__ = ["LOSSES", *_TERMS]
