"""Serving rows to a training step: ``PairDataset`` gives each row's image views (one crop, replayed for teacher
and student at each one's size) and captions; ``make_collate`` batches them with their tokens."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from ..transforms import PreprocessCfg, View, crop_uint8, eval_view, random_view
from .images import RawImages, image_problem, read_errors, read_problem
from .rows import Rows


class PairDataset(torch.utils.data.Dataset):
    """Serves rows as ``{"index", "caption", "views": {key: uint8 [3, S, S]}}``.

    ``views`` maps a key ("student", "teacher") to a PreprocessCfg; each key receives the
    *same* crop of the image at its own size (its normalisation is applied on the device, by the
    step module, with ``transforms.normalize``). The crop for item ``i`` in
    epoch ``e`` depends only on (seed, e, i), so a resumed run replays identical crops.
    Sampler indices encode the epoch: ``epoch * len(rows) + i``. A row whose image cannot be used
    comes back as ``{"index", "skip": reason}`` (the rules of ``distill data check``).
    """

    def __init__(
        self,
        rows: Rows,
        views: dict[str, PreprocessCfg],
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        seed: int = 0,
        reader: Any = None,
        flip: bool = False,
    ):
        self.rows = rows
        self.reader = reader or RawImages()  # or a PackedImages store
        self.views = views
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.seed = seed
        self.flip = flip

    def __len__(self) -> int:
        return len(self.rows)

    def view_for(self, index: int, epoch: int, width: int, height: int) -> View:
        if not self.augment:  # the eval crop at the teacher's size: the view 0 a cache of that teacher stores
            cfg = self.views.get("teacher") or next(iter(self.views.values()), None)
            return eval_view(width, height, cfg.resize_mode if cfg else "shortest", cfg.image_size if cfg else None)
        rng = np.random.default_rng([self.seed, epoch, index])
        return random_view(rng, width, height, scale=self.crop_scale, flip=self.flip)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, i = divmod(int(key), len(self.rows))
        item: dict[str, Any] = {"index": i, "caption": self.rows.captions[i], "teacher_text": self.rows.teacher_text(i)}
        path = self.rows.images[i]
        if self.views and path is not None:
            try:
                image, size = self.reader.open(path)
            except read_errors() as e:  # a bad file (even one deleted mid-run) must not stop a long run
                return {"index": i, "skip": read_problem(path, e)}
            problem = image_problem(*size)
            if problem:
                return {"index": i, "skip": problem}
            view = self.view_for(i, epoch, *size)  # from the original size: packed copies replay the same crop
            item["views"] = {k: crop_uint8(image, view, cfg) for k, cfg in self.views.items()}
        return item


def make_collate(tokenizers: dict[str, Callable[[list[str]], Any]],
                 priority: Callable[[list[str], Any], Any] | None = None) -> Callable:
    """Collate items into ``{"index", "captions", "views", "tokens": {key: tokenized}, "skipped"}``.

    ``skipped`` lists ``(row, reason)`` of the items left out (unreadable images; with tokenizers,
    rows without a caption); a batch whose every item was left out holds only ``skipped``. The
    ``"teacher"`` tokenizer reads each row's teacher text (its caption, or the source sentence of
    parallel data); the others read the captions. ``priority(captions, student tokens)`` adds
    ``token_priority`` (each student token's word class, for a syntax mask)."""

    def collate(items: list[dict]) -> dict[str, Any]:
        skipped = [(it["index"], it["skip"]) for it in items if "skip" in it]
        good = [it for it in items if "skip" not in it]
        if tokenizers:
            skipped += [(it["index"], "empty caption") for it in good if not it["caption"]]
            good = [it for it in good if it["caption"]]
        batch: dict[str, Any] = {"skipped": skipped}
        if not good:
            return batch
        batch["index"] = torch.tensor([it["index"] for it in good])
        batch["captions"] = [it["caption"] for it in good]
        if "views" in good[0]:
            batch["views"] = {k: torch.stack([it["views"][k] for it in good]) for k in good[0]["views"]}
        teacher_texts = [it.get("teacher_text") or it["caption"] for it in good]
        batch["tokens"] = {k: tok(teacher_texts if k == "teacher" else batch["captions"]) for k, tok in tokenizers.items()}
        if priority is not None and "student" in batch["tokens"]:
            batch["token_priority"] = priority(batch["captions"], batch["tokens"]["student"])
        return batch

    return collate
