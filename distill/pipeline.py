"""From rows to batches, for every trainer: one builder (``build_pipeline``).

    rows -> usable rows (the rules of ``distill data check``) -> the rows the teacher side has targets for
         -> train rows + a held-out slice -> dataset + collate (the trained model's views and tokens, the
         teacher side's) -> loader factory (batch order, ``data.group_by_length``) -> data fingerprint

A new trainer (an adapter, a new loss) gets its batches here and only trains.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from . import dist, tokens
from .data import PairDataset, Rows, make_collate, make_loader_factory, split_usable
from .data.packed import image_reader
from .errors import DataError
from .run import SkipLog, data_fingerprint


@dataclass
class Pipeline:
    """What a run trains on. ``skipped``: (rows, row, why) of every row left out; ``held`` / ``held_keys``: the
    held-out slice (for health checks) and its cache keys; ``make_loader``: ``(consumed, rank, world) ->
    batches``."""

    rows: Rows
    train: Rows
    held: Rows
    dataset: Any
    collate: Callable
    make_loader: Callable[[int, int, int], Iterator]
    fingerprint: str
    skipped: list[tuple[Rows, int, str]] = field(default_factory=list)
    train_keys: tuple | None = None
    held_keys: tuple | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def with_dataset(self, dataset: Any, collate: Callable) -> "Pipeline":
        """The same batches of another dataset of the same rows (e.g. features computed once)."""
        self.dataset, self.collate = dataset, collate
        self.make_loader = make_loader_factory(dataset, collate, **self.options)
        return self

    def skip_log(self, path: Any, write: bool, resume: bool) -> SkipLog:
        """The run's SkipLog with every row the pipeline left out already in it."""
        skips = SkipLog(path, write=write, resume=resume)
        for rows, i, reason in self.skipped:
            skips.add(rows, i, reason)
        return skips


def build_pipeline(rows: Rows, recipe: Any, model: Any, targets: Any = None, hold_out: bool = False) -> Pipeline:
    """Batches of ``rows`` for training ``model`` (a Student) with ``targets`` (the teacher side, see
    ``cache.targets``; None when the model trains on its own, as in contrastive tuning). ``model`` None: the
    batches hold rows and captions only (a trainer that reads a frozen tower's table, ``features``)."""
    r = recipe
    dist.state(cpu=r.train.cpu, timeout_s=r.train.dist_timeout)  # several processes: the group, with the run's timeout
    # the rules of `distill data check`: in data with images, a row without one is left out, as is a row
    # without a caption in data with captions
    keep, why = split_usable(rows, need_image=rows.has_images, need_caption=rows.has_text)
    skipped = [(rows, i, reason) for i, reason in why.items()]
    rows = rows.subset(keep)
    keys = None
    if targets is not None and len(rows):
        before = rows
        rows, why, keys = targets.prepare(rows, progress=r.train.progress)
        skipped += [(before, i, reason) for i, reason in why.items()]
    if not len(rows):
        summary = SkipLog(None, write=False)
        for rs, i, reason in skipped:
            summary.add(rs, i, reason)
        raise DataError(f"{rows.source or 'the data'}: no usable rows to train on ({summary.summary() or 'empty'}); "
                        "`distill data check` lists them")
    train, held = _hold_out(rows, r.train) if hold_out else (list(range(len(rows))), [])
    pick = (lambda idx: None if keys is None else tuple([k[i] for i in idx] for k in keys))  # noqa: E731
    train_rows, train_keys = rows.subset(train), pick(train)
    dataset, collate = _dataset(train_rows, train_keys, r, model, targets)
    options = dict(batch_size=r.train.batch_size, seed=r.train.seed, pin=torch.cuda.is_available() and not r.train.cpu,
                   num_workers=r.data.num_workers if rows.has_images else 0,
                   lengths=model.token_counts(train_rows.captions) if r.data.group_by_length and model else None)
    fingerprint = None
    with dist.stop_together("while fingerprinting the data"):  # one process reads the data, the others hear it
        if dist.is_main():
            fingerprint = data_fingerprint(train_rows, train_keys[0] if train_keys else None, progress=r.train.progress)
    fingerprint = dist.broadcast_object(fingerprint, "the data fingerprint")
    return Pipeline(rows, train_rows, rows.subset(held), dataset, collate,
                    make_loader_factory(dataset, collate, **options), fingerprint, skipped, train_keys, pick(held),
                    options)


def image_caption_rows(recipe: Any, data: Any, needs: str) -> tuple[Any, Rows]:
    """(the source, its rows) a run trains on: ``data`` or ``data.train``; image-caption pairs, or one line
    saying ``needs`` them."""
    from .data import as_rows
    from .errors import RecipeError

    r = recipe
    source = data if data is not None else r.data.train
    if source is None or (isinstance(source, str) and not source):
        raise RecipeError("data.train: no training data: pass fit(data) or set data.train")
    rows = as_rows(source, image_column=r.data.image_column, caption_column=r.data.caption_column)
    if not rows.has_images or not rows.has_text:
        raise DataError(f"{rows.source}: {needs} image-caption pairs")
    return source, rows


def _dataset(rows: Rows, keys: tuple | None, r: Any, model: Any, targets: Any):
    """(dataset, collate): the trained model's views and tokens, and what the teacher side adds."""
    text_target = targets is None or targets.has_text or not targets.text
    views = {"student": model.preprocess} if model is not None and rows.has_images and model.image is not None else {}
    tokenizers = {"student": model.tokenize} if model is not None and rows.has_text and model.text is not None \
        and text_target else {}
    words = tokens.syntax_annotator(r.train.schedule, model.text if tokenizers else None)
    reader = image_reader(r.data.packed)
    if targets is not None:
        return targets.data(rows, keys, views, tokenizers, words, r, reader)
    dataset = PairDataset(rows, views, r.data.augment, r.data.crop_scale, r.train.seed, reader, flip=r.data.flip)
    return dataset, make_collate(tokenizers, words)


def _hold_out(rows: Rows, t: Any) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): a slice of whole images for the health checks (none for small or
    text-only data)."""
    from .health import hold_out

    n_images = len({i for i in rows.images if i})
    size = min(t.health_rows, n_images // 10)
    if t.health_every <= 0 or size < 32 or not rows.has_text:
        return list(range(len(rows))), []
    return hold_out(rows, size, t.seed)


__all__ = ["Pipeline", "build_pipeline", "image_caption_rows"]
