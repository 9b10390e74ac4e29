"""Distillation losses: pure tensor modules, built by name and summed with weights.

Every loss takes the same ``Embeddings`` (student and teacher, image and text; any
may be None) and returns a scalar. Regression losses compare each student tower with
the teacher's embedding of the same input; contrastive ones use in-batch negatives.

References: CLIP-KD (Yang et al., 2024) for feature, contrastive and affinity
distillation; TinyCLIP (Wu et al., 2023) for affinity mimicking.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dist import gather_rows
from ..errors import RecipeError
from . import LOSSES


@dataclass
class Embeddings:
    """Student outputs (unnormalised) and teacher embeddings for one batch."""

    s_img: torch.Tensor | None = None
    s_txt: torch.Tensor | None = None
    t_img: torch.Tensor | None = None
    t_txt: torch.Tensor | None = None

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(student, teacher) pairs of the same input, normalised."""
        out = []
        if self.s_img is not None and self.t_img is not None:
            out.append((F.normalize(self.s_img.float(), dim=-1), F.normalize(self.t_img.float(), dim=-1)))
        if self.s_txt is not None and self.t_txt is not None:
            out.append((F.normalize(self.s_txt.float(), dim=-1), F.normalize(self.t_txt.float(), dim=-1)))
        return out

    def cross_pairs(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(student, teacher same input, teacher reference) for contrastive terms: the reference is
        the teacher's other modality when the batch has it, else the teacher's same modality."""
        out = []
        for s, t_same, t_other in ((self.s_img, self.t_img, self.t_txt), (self.s_txt, self.t_txt, self.t_img)):
            if s is None or (t_same is None and t_other is None):
                continue
            ref = t_other if t_other is not None else t_same
            out.append((F.normalize(s.float(), dim=-1),
                        F.normalize((t_same if t_same is not None else ref).float(), dim=-1),
                        F.normalize(ref.float(), dim=-1)))
        return out


def full_precision(x: torch.Tensor):
    """No autocast inside the losses: under bf16/fp16 a cosine of 1 rounds to 0.996, and matching
    positives by ``> 1 - 1e-4`` (or small logit gaps) would go wrong. Inputs are cast to float32."""
    return torch.autocast(x.device.type, enabled=False)


def _mean(terms: list[torch.Tensor]) -> torch.Tensor:
    if not terms:
        from ..errors import ModelError

        raise ModelError("no student/teacher embeddings to compare in this batch: the student's towers and the "
                         "teacher's (or the cache's) embeddings have no modality in common")
    return torch.stack(terms).mean()


class CosineLoss(nn.Module):
    """1 - cosine(student, teacher), averaged over the batch and over towers."""

    def forward(self, e: Embeddings) -> torch.Tensor:
        return _mean([(1 - (s * t).sum(-1)).mean() for s, t in e.pairs()])


class MSELoss(nn.Module):
    """Mean squared error between normalised student and teacher embeddings (per element)."""

    def forward(self, e: Embeddings) -> torch.Tensor:
        return _mean([F.mse_loss(s, t) for s, t in e.pairs()])


class SmoothL1Loss(nn.Module):
    """Smooth-L1 between normalised embeddings; ``beta`` is the L2/L1 switch point."""

    def __init__(self, beta: float = 0.01):
        super().__init__()
        self.beta = beta

    def forward(self, e: Embeddings) -> torch.Tensor:
        return _mean([F.smooth_l1_loss(s, t, beta=self.beta) for s, t in e.pairs()])


class EmbeddingQueue:
    """FIFO of the latest ``size`` embeddings (normalised, no gradients), newest first, with
    optional ids (e.g. caption ids, so repeats of a row's own target can be recognised). Its state is
    checkpointed (``state`` / ``load``), so a resumed run sees the same negatives."""

    def __init__(self, size: int):
        self.size = size
        self.emb: torch.Tensor | None = None
        self.ids: torch.Tensor | None = None

    def get(self, side: str):
        """``(side, embeddings, ids)`` as ``clip_loss`` takes it, or None while empty."""
        return None if self.emb is None else (side, self.emb, self.ids)

    def push(self, emb: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        emb = F.normalize(emb.detach().float(), dim=-1)
        ids = None if ids is None else ids.to(emb.device)
        if self.emb is not None:
            emb = torch.cat([emb, self.emb.to(emb.device)])
            ids = None if ids is None else torch.cat([ids, self.ids.to(emb.device)])
        self.emb = emb[: self.size]
        self.ids = None if ids is None else ids[: self.size]

    def state(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {} if self.emb is None else {f"{prefix}emb": self.emb.cpu()}
        if self.ids is not None:
            out[f"{prefix}ids"] = self.ids.cpu()
        return out

    def load(self, state: dict[str, torch.Tensor], prefix: str) -> None:
        self.emb = state.get(f"{prefix}emb")
        self.ids = state.get(f"{prefix}ids")


def info_nce(rows: torch.Tensor, cols: torch.Tensor, positive: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """InfoNCE with any number of positives per row: ``-log`` of the softmax mass on the row's positive
    columns, averaged over rows. With one positive per row it is the usual cross-entropy; a target
    repeated in the batch (a class prompt, a duplicated caption) is a positive, never a negative.
    The one implementation behind distillation's ``contrastive`` loss and tuning's ``clip_loss``."""
    with full_precision(rows):
        logits = scale.float() * rows.float() @ cols.float().t()
        return (logits.logsumexp(-1) - logits.masked_fill(~positive, float("-inf")).logsumexp(-1)).mean()


def same_target(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """[len(a), len(b)] mask of equal (normalised) embeddings: the same caption or image, repeated."""
    with full_precision(a):
        return (a.float() @ b.float().t()) > 1 - tol


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor | None = None,
              queue: tuple[str, torch.Tensor, torch.Tensor] | None = None, gather: bool = True) -> torch.Tensor:
    """Symmetric CLIP InfoNCE between paired image and text embeddings (normalised here).

    ``ids``: one id per pair; pairs with the same id (the same caption, as with class prompts) are
    all positives. ``queue``: ``(side, embeddings, ids)`` of past, frozen ``side`` ("image" or "text")
    embeddings, added as extra columns (negatives, or positives where ids match) for the other side's rows.
    ``gather``: under several processes each process's rows are scored against the columns of every
    process (gradients flow back to their owners), so N processes x B equal one process x N*B."""
    with full_precision(img):
        return _clip_loss(img, txt, logit_scale, ids, queue, gather)


def _clip_loss(img, txt, logit_scale, ids, queue, gather) -> torch.Tensor:
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    scale = logit_scale.float().exp().clamp(max=100)
    img_all, offset = gather_rows(img, with_grad=True) if gather else (img, 0)
    txt_all, _ = gather_rows(txt, with_grad=True) if gather else (txt, 0)
    ids = ids.to(img.device) if ids is not None else torch.arange(len(img), device=img.device) + offset
    ids_all = gather_rows(ids)[0] if gather else ids
    cols_txt, ids_txt, cols_img, ids_img = txt_all, ids_all, img_all, ids_all
    if queue is not None and len(queue[1]):
        side, q, q_ids = queue
        q, q_ids = q.to(img.device), q_ids.to(img.device)
        if side == "text":  # every process's rows, then the queue's: the columns one process at N*B would see
            cols_txt, ids_txt = torch.cat([txt_all, q]), torch.cat([ids_all, q_ids])
        else:
            cols_img, ids_img = torch.cat([img_all, q]), torch.cat([ids_all, q_ids])
    return (info_nce(img, cols_txt, ids[:, None] == ids_txt[None, :], scale)
            + info_nce(txt, cols_img, ids[:, None] == ids_img[None, :], scale)) / 2


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE between student embeddings and the teacher's embeddings of the paired
    other modality (student image <-> teacher text), with a learnable temperature.

    Row i of the student batch must match row i of the teacher reference batch; every
    other row is a negative, except rows whose reference is the same (a repeated caption, such as a
    class prompt): those are positives too (``info_nce``). Falls back to the teacher's same-modality
    embeddings when the batch has no other modality (image-only or text-only data).

    ``gather`` (default): under several processes the teacher references of every process are the
    columns of each process's student rows (and every student row a column of the reverse term,
    gradients flowing back to its process), so N processes at micro-batch B compute the loss of one
    process at N*B. Off, each process sees only its own micro-batch as negatives.

    ``queue``: keep this many past teacher references as extra negatives for the student rows
    (MoCo-style; free with a cache, since teacher embeddings never change), so a micro-batch of 32
    still sees thousands of negatives. Queue entries equal to a row's own reference count as its
    positives. The queue is checkpointed with the run.
    """

    def __init__(self, init_temperature: float = 0.07, learnable: bool = True, max_scale: float = 100.0,
                 queue: int = 0, gather: bool = True):
        super().__init__()
        self.gather = gather
        if not init_temperature > 0:
            raise RecipeError(f"loss.kwargs.contrastive.init_temperature: {init_temperature!r} must be > 0")
        if int(queue) < 0:
            raise RecipeError(f"loss.kwargs.contrastive.queue: {queue!r} must be >= 0")
        scale = torch.tensor(math.log(1 / init_temperature))
        if learnable:
            self.logit_scale = nn.Parameter(scale)
        else:
            self.register_buffer("logit_scale", scale)
        self.max_scale = max_scale
        self.queue_size = int(queue)
        self._queues: dict[int, EmbeddingQueue] = {}  # one per (student, reference) pair

    def forward(self, e: Embeddings) -> torch.Tensor:
        with full_precision(self.logit_scale):
            return self._forward(e)

    def _forward(self, e: Embeddings) -> torch.Tensor:
        scale = self.logit_scale.float().exp().clamp(max=self.max_scale)
        terms = []
        for k, (s, _, ref) in enumerate(e.cross_pairs()):
            ref_all = gather_rows(ref)[0] if self.gather else ref  # teacher side: no gradient to send
            s_all = gather_rows(s, with_grad=True)[0] if self.gather else s
            cols = ref_all
            q = self._queues.get(k)
            if q is not None and q.emb is not None and q.emb.shape[-1] == ref.shape[-1]:
                cols = torch.cat([ref_all, q.emb.to(ref.device)])
            forward = info_nce(s, cols, same_target(ref, cols), scale)
            reverse = info_nce(ref, s_all, same_target(ref, ref_all), scale)
            terms.append((forward + reverse) / 2)
            if self.queue_size and self.training:  # every process pushes the same rows: one queue
                self._queues.setdefault(k, EmbeddingQueue(self.queue_size)).push(ref_all)
        return _mean(terms)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, q in self._queues.items():
            out.update(q.state(f"queue{k}."))
        return out

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for k in sorted({int(n.split(".")[0][5:]) for n in state if n.startswith("queue")}):
            self._queues.setdefault(k, EmbeddingQueue(self.queue_size)).load(state, f"queue{k}.")


class AffinityLoss(nn.Module):
    """KL(teacher || student) between in-batch similarity distributions: each student row's
    softmax over similarities to the teacher reference batch is pulled to the teacher's."""

    def __init__(self, tau: float = 0.1, gather: bool = True):
        super().__init__()
        if not tau > 0:
            raise RecipeError(f"loss.kwargs.affinity.tau: {tau!r} must be > 0")
        self.tau = tau
        self.gather = gather  # the references of every process, as ContrastiveLoss does

    def forward(self, e: Embeddings) -> torch.Tensor:
        terms = []
        for s, t, ref in e.cross_pairs():
            ref = gather_rows(ref)[0] if self.gather else ref
            with full_precision(s):
                terms.append(self._kl(s, t, ref))
        return _mean(terms)

    def _kl(self, s: torch.Tensor, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        log_p_s = F.log_softmax(s @ ref.t() / self.tau, dim=-1)
        log_p_t = F.log_softmax(t @ ref.t() / self.tau, dim=-1)
        return F.kl_div(log_p_s, log_p_t, log_target=True, reduction="batchmean")


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    try:
        return LOSSES.create(name, **kwargs)
    except TypeError as e:  # an option the loss does not take
        raise RecipeError(f"loss.kwargs.{name}: {e}") from None


class DistillLoss(nn.Module):
    """Weighted sum of named losses; returns the total and each term (for logging)."""

    def __init__(self, weights: dict[str, float], kwargs: dict[str, dict[str, Any]] | None = None):
        super().__init__()
        kwargs = kwargs or {}
        unknown = set(kwargs) - set(weights)
        if unknown:
            raise RecipeError(f"loss.kwargs: options for {sorted(unknown)} which have no weight in loss.weights")
        self.weights = {k: float(v) for k, v in weights.items() if float(v) != 0.0}
        if not self.weights:
            raise RecipeError("loss.weights: every weight is zero")
        for k in self.weights:
            if k not in LOSSES:
                LOSSES.get(k)  # unknown name: the registry's message lists the known ones
        self.terms = nn.ModuleDict({k: create_loss(k, **kwargs.get(k, {})) for k in self.weights})

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        """State of the terms outside their parameters (queues), for checkpoints."""
        return {f"{k}.{n}": t for k, m in self.terms.items() if hasattr(m, "extra_tensors")
                for n, t in m.extra_tensors().items()}

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        for k, m in self.terms.items():
            mine = {n[len(k) + 1:]: t for n, t in state.items() if n.startswith(f"{k}.")}
            if mine and hasattr(m, "load_extra_tensors"):
                m.load_extra_tensors(mine)

    def forward(self, e: Embeddings) -> tuple[torch.Tensor, dict[str, float]]:
        ref = next(x for x in (e.s_img, e.s_txt, e.t_img, e.t_txt) if x is not None)
        with full_precision(ref):
            values = {k: m(e) for k, m in self.terms.items()}
        total = sum(self.weights[k] * v for k, v in values.items())
        return total, {k: float(v.detach()) for k, v in values.items()}
