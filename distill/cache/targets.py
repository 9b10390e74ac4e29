"""Where a distillation run's teacher embeddings come from: a live teacher, or its embedding cache, behind the
same calls (``Targets``). The trainer asks ``targets_for(...)`` and never decides cache policy itself.

Policy, in one place: a cache is checked against the named teacher before any weights load; rows the
cache lacks are encoded first ("cache-through") by the given or named teacher, never by one the user did
not name; the views a cache stores must be the crops the recipe asks for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..data import PairDataset, Rows, make_collate
from ..errors import CacheError, CacheMismatchError, FileFormatError, MissingFileError, RecipeError, UnknownNameError
from ..config import DEFAULT_TEACHER
from ..io import read_json
from .dataset import CachedPairDataset, cached_collate, lookup, missing_error
from .store import EmbeddingCache


class Targets:
    """The teacher side of a run. ``prepare(rows)`` keeps the rows it has (or can make) targets for;
    ``data(...)`` serves them with the teacher's side of each batch; ``batch(...)`` gives a batch's teacher
    embeddings in the step; ``embed(...)`` those of a held-out slice."""

    identity: dict[str, Any]
    embed_dim: int
    has_image: bool
    has_text: bool
    teacher: Any = None  # the loaded teacher, when there is one
    text: bool = True  # captions get the teacher's text embedding (False: captions are learnt onto images)

    def describe(self) -> str:
        return f"the teacher {self.identity.get('backend')}:{self.identity.get('name')!r}"


class LiveTeacher(Targets):
    """A teacher run on every batch, on the same crop the student sees."""

    def __init__(self, teacher: Any, text: bool = True):
        self.teacher, self.text = teacher, text
        self.identity, self.embed_dim = teacher.identity, teacher.embed_dim
        self.has_image, self.has_text = teacher.has_image, teacher.has_text

    def prepare(self, rows: Rows, progress: bool = True) -> tuple[Rows, dict[int, str], tuple | None]:
        return rows, {}, None

    def data(self, rows: Rows, keys: tuple | None, views: dict, tokenizers: dict, words: Callable | None,
             recipe: Any, reader: Any = None):
        """(dataset, collate): the student's views and tokens, and the teacher's."""
        views, tokenizers = dict(views), dict(tokenizers)
        if rows.has_images and self.has_image:
            views["teacher"] = self.teacher.preprocess
        if rows.has_text and self.has_text and self.text:
            tokenizers["teacher"] = self.teacher.tokenize
        d = recipe.data
        dataset = PairDataset(rows, views, d.augment, d.crop_scale, recipe.train.seed, reader, flip=d.flip)
        return dataset, make_collate(tokenizers, words)

    def batch(self, batch: dict[str, Any], pixels: dict[str, torch.Tensor], device: torch.device):
        t = self.teacher
        if t.device != device:
            t.to(device)
        t_img = t.encode_image(pixels["teacher"]) if "teacher" in pixels else None
        t_txt = t.encode_text(batch["tokens"]["teacher"]) if "teacher" in batch.get("tokens", {}) else None
        return t_img, t_txt

    def embed(self, images: list[str], texts: list[str], image_keys=None, text_keys=None):
        from ..eval import embed_images, embed_texts

        return (embed_images(self.teacher, images) if self.has_image and images else None,
                embed_texts(self.teacher, texts) if self.has_text and texts else None)


class InBatch(Targets):
    """Teacher embeddings the batch already carries (``batch["teacher_emb"]``: what a cache's collate adds, or
    made-up ones for a probe of the step alone)."""

    def __init__(self, embed_dim: int, has_image: bool = True, has_text: bool = True):
        self.identity, self.embed_dim = {"backend": "in-batch", "name": ""}, embed_dim
        self.has_image, self.has_text = has_image, has_text

    def batch(self, batch: dict[str, Any], pixels: dict[str, torch.Tensor], device: torch.device):
        cached = {k: v.to(device, non_blocking=True) for k, v in batch["teacher_emb"].items()}
        return cached.get("image"), cached.get("text")


class CachedTeacher(InBatch):
    """A teacher's embeddings read from a cache (``cache/``); the teacher itself is loaded only when rows the
    cache lacks must be encoded, and only when it is given or named."""

    def __init__(self, cache_dir: str | Path, teacher: Any = None, named: str | None = None, recipe: Any = None,
                 service: Any = None, text: bool = True, load: Callable[[str], Any] | None = None):
        self.dir, self.teacher, self.named, self.recipe = Path(cache_dir), teacher, named, recipe
        self.service, self.text, self._load = service, text, load
        self.cache = _open(self.dir, can_encode=teacher is not None or named is not None)
        if self.cache is None and teacher is None:  # no finished cache yet: its teacher builds it
            self.teacher = self._load(named)
        if self.cache is not None and self.teacher is not None:
            self.cache.check(self.teacher, allow_stale=recipe.cache.allow_stale)
        elif self.cache is not None and named:
            _check_named(self.cache, named, recipe)

    @property
    def identity(self) -> dict[str, Any]:
        return self.cache.manifest["teacher"] if self.cache is not None else self.teacher.identity

    @property
    def embed_dim(self) -> int:
        return self.cache.embed_dim if self.cache is not None else self.teacher.embed_dim

    @property
    def has_image(self) -> bool:
        if self.teacher is not None:
            return self.teacher.has_image
        return self.cache.manifest.get("preprocess") is not None

    @property
    def has_text(self) -> bool:
        return self.teacher.has_text if self.teacher is not None else True

    def describe(self) -> str:
        if self.teacher is not None:
            return f"the teacher {self.teacher.name!r}"
        t = self.identity
        return f"the cache's teacher {t.get('backend')}:{t.get('name')!r}"

    def prepare(self, rows: Rows, progress: bool = True) -> tuple[Rows, dict[int, str], tuple]:
        """The rows the cache has embeddings for, after encoding those it lacks; (rows, {row: why skipped},
        (image keys, text keys) of the rows kept). Only the embeddings the teacher has are looked up."""
        image = rows.has_images and self.has_image
        found = lookup(rows, self.cache, progress=progress, text=self.text, image=image) \
            if self.cache is not None else None
        if found is None or found.missing:
            self._encode(rows if found is None else rows.subset(found.missing), rows, found, image)
            found = lookup(rows, self.cache, progress=False, text=self.text, image=image)
            if found.missing:  # the build encodes or skips (with a reason) every row it is given
                raise CacheError(f"{self.dir}: {len(found.missing)} rows are still missing after the build")
        self._check_views()
        keep = found.usable()
        return rows.subset(keep), found.skipped, ([found.image_keys[i] for i in keep], [found.text_keys[i] for i in keep])

    def _encode(self, todo: Rows, rows: Rows, found: Any, image: bool) -> None:
        """Encode rows the cache lacks with the given or named teacher (never one that was not named)."""
        from .build import TeacherService

        r = self.recipe
        if self.teacher is None:
            if not self.named:
                raise missing_error(rows, found, self.cache)
            self.teacher = self._load(self.named)
            if self.cache is not None:
                self.cache.check(self.teacher, allow_stale=r.cache.allow_stale)
        if self.cache is not None:
            p = self.cache.manifest["view_policy"]
            policy = dict(views=p["views"], seed=p["seed"], scale=p["scale"], ratio=p["ratio"], flip=p.get("flip", False))
            dtype = self.cache.manifest["dtype"]
        else:
            policy = dict(views=r.cache.views, seed=r.train.seed, scale=r.data.crop_scale, flip=r.data.flip)
            dtype = r.cache.dtype
        from ..data.packed import image_reader

        service = self.service or TeacherService(self.teacher, self.dir, dtype=dtype, num_workers=r.data.num_workers,
                                                 progress=r.train.progress, reader=image_reader(r.data.packed))
        if not self.text:
            todo.teacher_texts = [None] * len(todo)  # the teacher reads no caption
        if not image:
            todo.images = [None] * len(todo)  # nor any image
        service.build(todo, **policy)
        self.cache = EmbeddingCache.open(self.dir)

    def _check_views(self) -> None:
        """The stored random views must be the crops the recipe asks for (data.crop_scale, data.flip)."""
        r, p = self.recipe, self.cache.manifest["view_policy"]
        if not r.data.augment or p["views"] < 2 or r.cache.allow_stale:
            return
        diff = []
        if [float(x) for x in r.data.crop_scale] != [float(x) for x in p["scale"]]:
            diff.append(f"data.crop_scale: {list(r.data.crop_scale)} in the recipe vs {p['scale']} in the cache")
        if bool(r.data.flip) != bool(p.get("flip", False)):
            diff.append(f"data.flip: {r.data.flip} in the recipe vs {p.get('flip', False)} in the cache")
        if diff:
            raise CacheMismatchError(f"cache {self.cache.path} stores other views than the recipe asks for "
                                     f"({'; '.join(diff)}): set the recipe to the cache's values, rebuild the cache, "
                                     "or data.augment=false")

    def data(self, rows: Rows, keys: tuple | None, views: dict, tokenizers: dict, words: Callable | None,
             recipe: Any, reader: Any = None):
        dataset = CachedPairDataset(rows, keys[0], keys[1], self.cache, views.get("student"), recipe.data.augment,
                                    recipe.train.seed, reader)
        return dataset, cached_collate(self.cache, make_collate(tokenizers, words))

    def embed(self, images: list[str], texts: list[str], image_keys=None, text_keys=None):
        return (self.cache.image_embeddings(image_keys, [0] * len(image_keys)) if image_keys else None,
                self.cache.text_embeddings(text_keys) if text_keys else None)


def targets_for(teacher: Any, recipe: Any, load: Callable[[str], Any], text: bool = True) -> Targets:
    """The teacher side of a run, from what the caller gave (a Teacher, a name, a ``TeacherService``, or None)
    and the recipe (``teacher.name``, ``cache.dir``). A teacher that is only named is not loaded while a
    cache can serve it: the cache's recorded teacher is checked against the name instead."""
    from .build import TeacherService

    service = teacher if isinstance(teacher, TeacherService) else None
    if service is not None:
        teacher = service.teacher
    cache_dir = recipe.cache.dir or (str(service.dir) if service else None)
    named = teacher if isinstance(teacher, str) else (recipe.teacher.name or None)
    if isinstance(teacher, str):
        teacher = None  # named: loaded only if it must encode something
    if cache_dir:
        return CachedTeacher(cache_dir, teacher, named, recipe, service, text, load)
    return LiveTeacher(teacher if teacher is not None else load(named or DEFAULT_TEACHER), text)


def _open(path: Path, can_encode: bool) -> EmbeddingCache | None:
    """The finished cache at ``path``; None when there is none yet (or a killed build) and a teacher can make it."""
    manifest = path / "manifest.json"
    if not manifest.exists():
        if not can_encode:
            raise CacheError(f"{path}: no cache there (no manifest.json) and no teacher named to build one; build it "
                             "with `distill cache build` or name teacher.name")
        return None
    try:
        complete = bool(read_json(manifest).get("complete"))
    except ValueError:
        complete = True  # let open() name the problem
    if not complete and can_encode:
        return None  # a killed build: the run resumes it
    return EmbeddingCache.open(path)


def _check_named(cache: EmbeddingCache, named: str, recipe: Any) -> None:
    """The teacher the recipe names must be the one the cache was built with (no weights loaded)."""
    from ..teachers import expected_identity

    if recipe.cache.allow_stale:
        return
    try:
        want = expected_identity(named, recipe.teacher.pretrained, **recipe.teacher.kwargs)
    except (UnknownNameError, MissingFileError, FileFormatError) as e:
        raise RecipeError(f"teacher.name: {e}") from None
    have = cache.manifest["teacher"]
    diff = [f"teacher.{k}: {have.get(k)!r} in the cache vs {v!r} for teacher.name={named!r}"
            for k, v in want.items() if have.get(k) != v]
    if diff:
        raise CacheMismatchError(f"cache {cache.path} was built with another teacher than the recipe names "
                                 f"({'; '.join(diff)}). Use the cache's teacher, rebuild the cache, or pass "
                                 "allow_stale=True (--allow-stale) to use it anyway.")


__all__ = ["Targets", "LiveTeacher", "InBatch", "CachedTeacher", "targets_for", "DEFAULT_TEACHER"]
