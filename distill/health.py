"""Health checks during training, on a small held-out slice: warn loudly when the student's
embeddings collapse, when the student is still at chance after warm-up, or when the teacher itself
is at chance (wrong weights or wrong preprocessing)."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import Rows, open_image
from .eval import caption_pairs, retrieval_recall

log = logging.getLogger(__name__)

COLLAPSE_COSINE = 0.95  # mean pairwise cosine above this = collapsed embeddings
CHANCE_FACTOR = 2.0  # R@1 at or below this many times chance = "at chance"


def hold_out(rows: Rows, size: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): ``size`` whole images (all their captions) set aside."""
    images = list(dict.fromkeys(i for i in rows.images if i))
    held = set(np.random.default_rng([seed, 4242]).permutation(len(images))[:size].tolist())
    held_paths = {images[i] for i in held}
    train = [i for i, p in enumerate(rows.images) if p not in held_paths]
    return train, [i for i, p in enumerate(rows.images) if p in held_paths]


def mean_pairwise_cosine(emb: torch.Tensor) -> float:
    x = F.normalize(emb.float(), dim=-1)
    n = len(x)
    return float(((x @ x.t()).sum() - n) / max(1, n * (n - 1)))


class HealthCheck:
    """Student checks against fixed teacher embeddings of a held-out slice.

    Args:
        rows: the held-out rows (images and captions).
        teacher_image / teacher_text: teacher embeddings of the slice's unique images / captions.
        warmup_steps: no chance alarm before this step.
    """

    def __init__(self, rows: Rows, teacher_image: torch.Tensor | None, teacher_text: torch.Tensor | None,
                 warmup_steps: int = 0, out_file: str | Path | None = None):
        self.images, self.texts, self.pairs = caption_pairs(rows)
        self.t_img, self.t_txt = teacher_image, teacher_text
        self.warmup_steps = warmup_steps
        self.out_file = Path(out_file) if out_file else None
        self._pixels = None

    def _chance(self, n: int) -> float:
        return CHANCE_FACTOR / max(1, n)

    def teacher_alarms(self) -> list[str]:
        """The teacher's own image->text R@1 on the slice; at chance means wrong weights/preprocessing."""
        if self.t_img is None or self.t_txt is None or len(self.texts) < 16:
            return []
        r1 = retrieval_recall(self.t_img, self.t_txt, self.pairs, ks=(1,))["i2t_r1"]
        if r1 <= self._chance(len(self.texts)):
            return [f"the TEACHER is at chance on the held-out slice (image->text R@1 {r1:.3f}, chance "
                    f"{1 / len(self.texts):.3f}): check its weights and preprocessing"]
        return []

    @torch.no_grad()
    def student_alarms(self, student: Any, step: int) -> tuple[list[str], dict[str, float]]:
        was_training = student.training
        student.eval()
        try:
            emb, ref = self._student_embeddings(student)
        finally:
            student.train(was_training)
        stats = {"mean_pairwise_cosine": mean_pairwise_cosine(emb)}
        alarms = []
        if stats["mean_pairwise_cosine"] > COLLAPSE_COSINE:
            alarms.append(f"student embeddings COLLAPSED at step {step}: mean pairwise cosine "
                          f"{stats['mean_pairwise_cosine']:.3f} on the held-out slice")
        if ref is not None and len(self.texts) >= 16:
            stats["r1"] = retrieval_recall(*ref, self.pairs, ks=(1,))["i2t_r1"]
            if step >= self.warmup_steps and stats["r1"] <= self._chance(len(self.texts)):
                alarms.append(f"student is at CHANCE at step {step} after warm-up: held-out image->text R@1 "
                              f"{stats['r1']:.3f} (chance {1 / len(self.texts):.3f})")
        return alarms, stats

    def _student_embeddings(self, student):
        device = next(student.parameters()).device
        if student.image is not None and self.images:
            if self._pixels is None:
                tf = student.image_transform
                self._pixels = torch.stack([tf(open_image(p)) for p in self.images])
            emb = torch.cat([student.encode_image(self._pixels[i:i + 128].to(device)).float().cpu()
                             for i in range(0, len(self._pixels), 128)])
            return emb, (emb, self.t_txt) if self.t_txt is not None else None
        emb = student.encode_text(self.texts).float().cpu()
        return emb, (self.t_img, emb) if self.t_img is not None else None

    def __call__(self, student: Any, step: int) -> list[str]:
        alarms, stats = self.student_alarms(student, step)
        self.report(step, alarms, stats)
        return alarms

    def report(self, step: int, alarms: Sequence[str], stats: dict[str, float] | None = None) -> None:
        for a in alarms:
            print(f"\n*** WARNING (health check): {a} ***", file=sys.stderr, flush=True)
            log.warning(a)
        if self.out_file is not None:
            with open(self.out_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "alarms": list(alarms), **(stats or {})}) + "\n")
