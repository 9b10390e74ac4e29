"""Training from a cache: find each row's cached embeddings, and serve rows with the stored view
replayed at the student's preprocessing."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from ..data import RawImages, Rows, image_problem, read_errors, read_problem
from ..errors import CacheMissError
from ..transforms import PreprocessCfg, crop_uint8
from .keys import MISSING, image_keys, text_key
from .store import EmbeddingCache

log = logging.getLogger(__name__)


@dataclass
class Lookup:
    """Cache keys of every row; rows the cache lacks; rows to skip, with why (a data problem)."""

    image_keys: list[str | None]
    text_keys: list[str | None]
    missing: list[int] = field(default_factory=list)
    skipped: dict[int, str] = field(default_factory=dict)

    def usable(self) -> list[int]:
        gone = set(self.missing) | set(self.skipped)
        return [i for i in range(len(self.image_keys)) if i not in gone]


def lookup(rows: Rows, cache: EmbeddingCache, progress: bool = True, text: bool = True, image: bool = True) -> Lookup:
    """Keys of ``rows`` in ``cache`` (images by content: however their paths are spelled; captions by
    the text the teacher reads). ``text=False`` / ``image=False``: the run needs no caption / image embeddings."""
    paths = list(dict.fromkeys(p for p in rows.images if p)) if image else []
    keys, located = image_keys(paths, cache.key_index, progress=progress)
    by_path = dict(zip(paths, keys))
    exists = {p: st is not None for p, (_, st) in zip(paths, located)}
    texts = rows.teacher_texts if rows.teacher_texts is not None else rows.captions
    out = Lookup([by_path[p] if p and image else None for p in rows.images],
                 [text_key(c) if c and text else None for c in texts])
    for i, (k, t) in enumerate(zip(out.image_keys, out.text_keys)):
        if k is not None and k.startswith(MISSING):
            out.skipped[i] = "missing file" if not exists.get(rows.images[i], True) else "unreadable file"
        elif k is not None and k not in cache.image_index:
            if k in cache.skipped:
                out.skipped[i] = cache.skipped[k]
            else:
                out.missing.append(i)
        elif t is not None and t not in cache.text_index:
            if t in cache.skipped:
                out.skipped[i] = cache.skipped[t]
            else:
                out.missing.append(i)
    return out


def missing_error(rows: Rows, found: Lookup, cache: EmbeddingCache, examples: int = 2) -> CacheMissError:
    """How many rows the cache lacks, with example paths next to the closest cached ones."""
    lines = []
    for i in found.missing[:examples]:
        if rows.images[i] and found.image_keys[i] not in cache.image_index:
            near = cache.closest(rows.images[i])
            lines.append(f"{rows.where(i)}: {rows.images[i]}" + (f" (closest cached: {near})" if near else ""))
        else:
            lines.append(f"{rows.where(i)}: caption {rows.captions[i]!r}")
    n = len(found.missing)
    return CacheMissError(
        f"{n} of {len(rows)} rows have no teacher embedding in the cache {cache.path} and no teacher is named to "
        f"encode them; e.g. {'; '.join(lines)}. Images are keyed by content, so these are other files (or other "
        "captions): name the teacher (teacher.name, or pass it to Distiller) to add them to the cache, or build "
        "it with `distill cache build`.")


class CachedPairDataset(torch.utils.data.Dataset):
    """Rows served with the cache's stored view replayed at the student's preprocessing.

    Each item names the cache rows of its teacher targets; ``cached_collate`` gathers them per batch
    as memory-mapped slices. View ``v`` of item ``i`` in epoch ``e`` is drawn from (seed, e, i).
    An image that cannot be used now is skipped with the reason, as ``PairDataset`` does.
    """

    def __init__(self, rows: Rows, image_keys: list[str | None], text_keys: list[str | None],
                 cache: EmbeddingCache, student_pre: PreprocessCfg | None, augment: bool = True, seed: int = 0,
                 reader: Any = None):
        self.rows, self.image_keys, self.text_keys = rows, image_keys, text_keys
        self.cache, self.pre, self.augment, self.seed = cache, student_pre, augment, seed
        self.reader = reader or RawImages()  # or a PackedImages store (views are fractions: same crops)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, i = divmod(int(key), len(self.rows))
        item: dict[str, Any] = {"index": i, "caption": self.rows.captions[i], "text_key": self.text_keys[i],
                                "image_key": self.image_keys[i], "view": 0}
        if item["image_key"] is not None:
            if self.augment and self.cache.views > 1:
                item["view"] = int(np.random.default_rng([self.seed, epoch, i]).integers(self.cache.views))
            if self.pre is not None:
                path = self.rows.images[i]
                try:
                    image, size = self.reader.open(path)
                except read_errors() as e:  # deleted or broken since the cache was built
                    return {"index": i, "skip": read_problem(path, e)}
                problem = image_problem(*size)
                if problem:
                    return {"index": i, "skip": problem}
                item["views"] = {"student": crop_uint8(image, self.cache.view(item["image_key"], item["view"]), self.pre)}
        return item


def cached_collate(cache: EmbeddingCache, base_collate: Callable) -> Callable:
    """Wrap a collate so each batch also carries the teacher embeddings read from the cache."""

    def collate(items):
        batch = base_collate(items)
        if "index" not in batch:
            return batch
        by_index = {it["index"]: it for it in items if "skip" not in it}
        kept = [by_index[i] for i in batch["index"].tolist()]
        emb = {}
        if all(it["image_key"] is not None for it in kept):
            emb["image"] = cache.image_embeddings([it["image_key"] for it in kept], [it["view"] for it in kept])
        if all(it["text_key"] is not None for it in kept):
            emb["text"] = cache.text_embeddings([it["text_key"] for it in kept])
        batch["teacher_emb"] = emb
        return batch

    return collate
