"""Distillation: ``Distiller(teacher, student).fit(data)`` plugs a frozen teacher (or its embedding
cache), a student and the weighted losses into the shared ``TrainLoop`` (``loop.py``).

What a run trains on is exactly what its recipe, data and teacher say: rows that cannot be used are
left out with a reason (``skipped.jsonl``), a cache is checked against the named teacher before it is
read, and a teacher that is not named is never loaded to fill rows a cache lacks.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dist, tokens
from .config import DEFAULT_TEACHER, Recipe, apply_options
from .data import PairDataset, Rows, as_rows, make_collate, split_usable
from .run import SkipLog
from .errors import (CacheError, CacheMismatchError, DataError, DataNotFoundError, FileFormatError, MissingFileError,
                     RecipeError, UnknownNameError)
from .loop import (FitResult, NonFiniteLossError, TrainLoop, check_output_dir, data_fingerprint,  # noqa: F401
                   image_reader, lr_at, make_loader_factory, make_optimizer, recipe_inputs, run_identity, run_inputs,
                   seed_everything)
from .losses import DistillLoss, Embeddings
from .transforms import normalize

log = logging.getLogger(__name__)


class Distiller:
    """Distil a frozen teacher into a student.

    Args:
        teacher: a Teacher, a name for :func:`distill.load_teacher`, a ``TeacherService`` (its cache is
            used, and extended with rows it lacks), or None with ``cache=DIR`` (training reads the cache
            only; rows it lacks are an error unless the recipe names a teacher to encode them).
        student: a Student, or a name for :func:`distill.create_student` (projected to the
            teacher's ``embed_dim``; initialised from ``train.seed``).
        recipe: a Recipe (``distill.config.load_recipe``); options override it.
        **options: recipe fields by name: ``output_dir``, ``batch_size``, ``max_steps``, ``lr``,
            ``image_size``, ``seed``, ``loss_weights``, ``grad_accum``, ``precision``, ``resume``,
            ``overwrite``, ``cache`` (an embedding cache folder), ``allow_stale``, ...

    Example:
        >>> result = Distiller(teacher, student, max_steps=500, output_dir="runs/x").fit("data.csv")
        >>> result.history["loss"][-1]
    """

    def __init__(self, teacher: Any = None, student: Any = None, *, recipe: Recipe | None = None, **options: Any):
        self.recipe = apply_options(recipe or Recipe(), options)
        self._teacher, self._student = teacher, student

    def build(self):
        """Resolve teacher, student and cache (loading/creating them by name from the recipe if needed).

        With a cache, a teacher that is only named is not loaded: the cache's recorded teacher is
        checked against the name (identity fields, no weights loaded) and training reads the cache."""
        from .cache import TeacherService

        r = self.recipe
        teacher, self._service = self._teacher, None
        if isinstance(teacher, TeacherService):
            self._service, teacher = teacher, teacher.teacher
        self.cache_dir = r.cache.dir or (str(self._service.dir) if self._service else None)
        self._named = teacher if isinstance(teacher, str) else (r.teacher.name or None)
        if isinstance(teacher, str):
            teacher = None  # named: loaded only if it must encode something
        cache = self._open_cache(can_encode=teacher is not None or self._named is not None)
        self._cache = cache
        if teacher is None and cache is None:
            teacher = self._load_teacher(self._named or DEFAULT_TEACHER)
        elif teacher is None and self._named:
            self._check_named(cache)
        if cache is not None and teacher is not None:
            cache.check(teacher, allow_stale=r.cache.allow_stale)
        embed_dim = teacher.embed_dim if teacher is not None else cache.embed_dim
        student = self._student if self._student is not None else r.student.name
        if isinstance(student, str):
            kwargs = dict(r.student.kwargs)
            if r.data.image_size is not None and "+" not in student:
                kwargs.setdefault("image_size", r.data.image_size)
            seed_everything(r.train.seed)  # the same recipe and seed give the same initial student
            try:
                from .students import create_student

                student = create_student(student, embed_dim=embed_dim, **kwargs)
            except UnknownNameError as e:
                raise RecipeError(f"student.name: {e}") from None
        if student.embed_dim != embed_dim:
            raise RecipeError(f"student: embed_dim {student.embed_dim} != the teacher's embed_dim {embed_dim}")
        _check_image_size(student, r.data.image_size)
        self._teacher, self._student = teacher, student
        return teacher, student

    def _open_cache(self, can_encode: bool):
        from .cache import EmbeddingCache
        from .io import read_json

        if not self.cache_dir:
            return None
        manifest = Path(self.cache_dir) / "manifest.json"
        if not manifest.exists():
            if not can_encode:
                raise CacheError(f"{self.cache_dir}: no cache there (no manifest.json) and no teacher named to build "
                                 "one; build it with `distill cache build` or name teacher.name")
            return None
        try:
            complete = bool(read_json(manifest).get("complete"))
        except ValueError:
            complete = True  # let open() name the problem
        if not complete and can_encode:
            return None  # a killed build: the run resumes it
        return EmbeddingCache.open(self.cache_dir)

    def _check_named(self, cache) -> None:
        """The teacher the recipe names must be the one the cache was built with (no weights loaded)."""
        from .teachers import expected_identity

        r = self.recipe
        if r.cache.allow_stale:
            return
        try:
            want = expected_identity(self._named, r.teacher.pretrained, **r.teacher.kwargs)
        except UnknownNameError as e:
            raise RecipeError(f"teacher.name: {e}") from None
        have = cache.manifest["teacher"]
        diff = [f"teacher.{k}: {have.get(k)!r} in the cache vs {v!r} for teacher.name={self._named!r}"
                for k, v in want.items() if have.get(k) != v]
        if diff:
            raise CacheMismatchError(f"cache {cache.path} was built with another teacher than the recipe names "
                                     f"({'; '.join(diff)}). Use the cache's teacher, rebuild the cache, or pass "
                                     "allow_stale=True (--allow-stale) to use it anyway.")

    def _load_teacher(self, name: str):
        from .teachers import load_teacher

        r = self.recipe
        try:
            return load_teacher(name, pretrained=r.teacher.pretrained, **r.teacher.kwargs)
        except (UnknownNameError, MissingFileError, FileFormatError) as e:
            raise RecipeError(f"teacher.name: {e}") from None

    def _prepare_cache(self, rows: Rows, teacher):
        """The cache with every row of ``rows`` in it: rows it lacks are encoded first ("cache-through")
        by the given or named teacher, never by one the user did not name. Returns (cache, lookup, teacher).
        Only the embeddings the teacher has are looked up (a text-only teacher writes no image's)."""
        from .cache import EmbeddingCache, TeacherService, lookup, missing_error

        r, path, cache = self.recipe, Path(self.cache_dir), self._cache
        text = not self._text_from_image  # captions learnt onto images need no caption embeddings
        image = rows.has_images and self._teacher_towers(teacher)[0]
        found = lookup(rows, cache, progress=r.train.progress, text=text, image=image) if cache is not None else None
        if found is None or found.missing:
            if teacher is None:
                if not self._named:
                    raise missing_error(rows, found, cache)
                teacher = self._load_teacher(self._named)
                if cache is not None:
                    cache.check(teacher, allow_stale=r.cache.allow_stale)
            if cache is not None:
                p = cache.manifest["view_policy"]
                policy = dict(views=p["views"], seed=p["seed"], scale=p["scale"], ratio=p["ratio"], flip=p.get("flip", False))
                dtype = cache.manifest["dtype"]
            else:
                policy = dict(views=r.cache.views, seed=r.train.seed, scale=r.data.crop_scale, flip=r.data.flip)
                dtype = r.cache.dtype
            service = self._service or TeacherService(teacher, path, dtype=dtype, num_workers=r.data.num_workers,
                                                      progress=r.train.progress, reader=image_reader(r.data))
            todo = rows if found is None else rows.subset(found.missing)
            if not text:
                todo.teacher_texts = [None] * len(todo)  # the teacher reads no caption
            if not image:
                todo.images = [None] * len(todo)  # nor any image
            service.build(todo, **policy)
            cache = self._cache = EmbeddingCache.open(path)
            found = lookup(rows, cache, progress=False, text=text, image=image)
            if found.missing:  # the build encodes or skips (with a reason) every row it is given
                raise CacheError(f"{path}: {len(found.missing)} rows are still missing after the build")
        self._check_views(cache)
        return cache, found, teacher

    def _teacher_towers(self, teacher) -> tuple[bool, bool, str]:
        """(has an image tower, has a text tower, who) of the teacher, or of the cache's when none is loaded."""
        if teacher is not None:
            return teacher.has_image, teacher.has_text, f"the teacher {teacher.name!r}"
        m = self._cache.manifest
        return m.get("preprocess") is not None, True, \
            f"the cache's teacher {m['teacher'].get('backend')}:{m['teacher'].get('name')!r}"

    def _check_towers(self, teacher, student) -> None:
        """The teacher must give an embedding for every tower the student learns, before any data is read."""
        has_image, has_text, who = self._teacher_towers(teacher)
        if self._text_from_image and not has_image:
            raise RecipeError(f"data.text_target: image learns captions onto the teacher's image embeddings, and {who} "
                              "has no image tower: use data.text_target: caption")
        if student.image is not None and not has_image:
            raise RecipeError(f"student.name: the student has an image tower and {who} has none (it reads text "
                              "only): distil a text student, or name a teacher with an image tower")
        if student.text is not None and not self._text_from_image and not has_text:
            raise RecipeError(f"student.name: the student has a text tower and {who} has none: distil an image "
                              "student, or learn captions onto images with data.text_target: image")

    def _check_views(self, cache) -> None:
        """The stored random views must be the crops the recipe asks for (data.crop_scale, data.flip)."""
        r = self.recipe
        p = cache.manifest["view_policy"]
        if not r.data.augment or p["views"] < 2 or r.cache.allow_stale:
            return
        diff = []
        if [float(x) for x in r.data.crop_scale] != [float(x) for x in p["scale"]]:
            diff.append(f"data.crop_scale: {list(r.data.crop_scale)} in the recipe vs {p['scale']} in the cache")
        if bool(r.data.flip) != bool(p.get("flip", False)):
            diff.append(f"data.flip: {r.data.flip} in the recipe vs {p.get('flip', False)} in the cache")
        if diff:
            raise CacheMismatchError(f"cache {cache.path} stores other views than the recipe asks for "
                                     f"({'; '.join(diff)}): set the recipe to the cache's values, rebuild the cache, "
                                     "or data.augment=false")

    def fit(self, data: Any = None) -> FitResult:
        """Train; ``data``: a file/folder path or Rows (default: the recipe's ``data.train``)."""
        r = self.recipe
        teacher, student = self.build()
        if r.data.group_by_length and student.text is None:
            raise RecipeError("data.group_by_length: batches captions by their token length; this student has no "
                              "text tower (set it to false)")
        source = data if data is not None else r.data.train
        if source is None or (isinstance(source, str) and not source):
            raise RecipeError("data.train: no training data: pass fit(data) or set data.train")
        try:
            if r.data.parallel_source and not isinstance(source, Rows):
                from .data import load_parallel

                rows = load_parallel(source, r.data.parallel_source, r.data.parallel_targets,
                                     r.data.parallel_keep_source)
            else:
                rows = as_rows(source, image_column=r.data.image_column, caption_column=r.data.caption_column)
        except DataNotFoundError as e:
            if data is not None:
                raise
            import os

            raise DataNotFoundError(f"data.train: {e} (relative paths are read from {os.getcwd()})") from None
        if student.image is not None and not rows.has_images:
            raise DataError(f"{rows.source}: the student has an image tower but the data has no images")
        if student.image is None and not rows.has_text:
            raise DataError(f"{rows.source}: the student is text-only but the data has no captions")
        self._text_from_image = r.data.text_target == "image"
        if self._text_from_image and not (rows.has_images and rows.has_text):
            raise RecipeError("data.text_target: image learns captions onto their images' embeddings; the data "
                              f"({rows.source}) needs images and captions")
        self._check_towers(teacher, student)
        tokens.check_schedule(student, r.train.schedule)
        # the rules of `distill data check`: in data with images, a row without one is left out, as is
        # a row without a caption in data with captions
        keep, why = split_usable(rows, need_image=rows.has_images, need_caption=rows.has_text)
        skipped = [(rows, i, reason) for i, reason in why.items()]
        rows = rows.subset(keep)
        inputs = {**recipe_inputs(r), **run_inputs(source, rows, teacher, self._service)}
        check_output_dir(Path(r.train.output_dir), inputs, r.train.overwrite)  # before any work: a cache build takes long
        keys = None
        if self.cache_dir and len(rows):
            cache, found, teacher = self._prepare_cache(rows, teacher)
            skipped += [(rows, i, reason) for i, reason in found.skipped.items()]
            keep = found.usable()
            keys = ([found.image_keys[i] for i in keep], [found.text_keys[i] for i in keep])
            rows = rows.subset(keep)
        if not len(rows):
            summary = SkipLog(None, write=False)
            for rs, i, reason in skipped:
                summary.add(rs, i, reason)
            raise DataError(f"{rows.source or 'the data'}: no usable rows to train on ({summary.summary() or 'empty'}); "
                            "`distill data check` lists them")
        identity = self._cache.manifest["teacher"] if self.cache_dir else teacher.identity
        train, held = self._hold_out(rows)
        train_rows = rows.subset(train)
        if self.cache_dir:
            dataset, collate = self._cached_data(train_rows, [keys[0][i] for i in train],
                                                 [keys[1][i] for i in train], student)
        else:
            dataset, collate = self._online_data(train_rows, teacher, student)
        step_module = DistillStep(None if self.cache_dir else teacher, student,
                                  DistillLoss(r.loss.weights, r.loss.kwargs), text_from_image=self._text_from_image)
        pin = torch.cuda.is_available() and not r.train.cpu
        workers = r.data.num_workers if rows.has_images else 0
        train_keys = [keys[0][i] for i in train] if keys else None
        lengths = _token_lengths(student, train_rows.captions) if r.data.group_by_length else None
        teacher_id = {k: v for k, v in (identity or {}).items() if k != "path"}  # a moved teacher is the same
        run = run_identity(r, teacher=teacher_id, student=student.config(),
                           data=data_fingerprint(train_rows, train_keys, progress=r.train.progress))
        loop = TrainLoop(r, step_module,
                         make_loader_factory(dataset, collate, r.train.batch_size, r.train.seed, workers, pin, lengths),
                         run=run, rows=train_rows, data_hint=_data_hint(r, rows.has_images, bool(self.cache_dir)),
                         inputs=inputs)
        loop.claim()  # before anything is written into the output folder
        out = Path(r.train.output_dir)
        loop.skips = SkipLog(out / "skipped.jsonl", write=dist.is_main(), resume=loop.resume_from is not None)
        for rs, i, reason in skipped:
            loop.skips.add(rs, i, reason)
        health = self._health(rows.subset(held), [keys[0][i] for i in held] if keys else None,
                              [keys[1][i] for i in held] if keys else None, teacher, student, loop.skips) \
            if held and dist.is_main() else None  # the main process checks and writes health.jsonl
        hooks = [lambda step: health(student, step) if step % r.train.health_every == 0 else None] if health else []
        loop.hooks = hooks
        history, steps = loop.run()
        student.teacher_identity = identity
        student_dir = out / "student"
        if loop.is_main:
            student.cpu().eval().save(student_dir)
        return FitResult(out, history, student, student_dir, steps,
                         {"samples_per_s": loop.samples_per_s, "skipped": loop.skips.count, "timing": loop.timing})

    def _hold_out(self, rows: Rows) -> tuple[list[int], list[int]]:
        """(train rows, held-out rows): a slice of whole images for the health checks (none for small
        or text-only data)."""
        from .health import hold_out

        t = self.recipe.train
        n_images = len({i for i in rows.images if i})
        size = min(t.health_rows, n_images // 10)
        if t.health_every <= 0 or size < 32 or not rows.has_text:
            return list(range(len(rows))), []
        return hold_out(rows, size, t.seed)

    def _health(self, held: Rows, image_keys, text_keys, teacher, student, skips: SkipLog):
        """A HealthCheck with the teacher's embeddings of the held-out slice (from the cache when
        training from one); it warns about the teacher itself right away."""
        from .data import usable_image
        from .eval import caption_pairs, embed_images, embed_texts
        from .health import HealthCheck

        problems = {p: usable_image(p) for p in dict.fromkeys(x for x in held.images if x)}
        bad = [i for i, p in enumerate(held.images) if p and problems[p]]
        for i in bad:
            skips.add(held, i, problems[held.images[i]])
        ok = [i for i in range(len(held)) if i not in set(bad)]
        held = held.subset(ok)
        images, texts, _ = caption_pairs(held)
        if image_keys is not None:
            image_keys, text_keys = [image_keys[i] for i in ok], [text_keys[i] for i in ok]
            key_of_image, key_of_text = dict(zip(held.images, image_keys)), dict(zip(held.captions, text_keys))
            t_img = self._cache.image_embeddings([key_of_image[p] for p in images], [0] * len(images))
            t_txt = self._cache.text_embeddings([key_of_text[c] for c in texts])
        else:
            t_img = embed_images(teacher, images) if teacher.has_image else None
            t_txt = embed_texts(teacher, texts) if teacher.has_text else None
        out = Path(self.recipe.train.output_dir)
        check = HealthCheck(held, t_img, t_txt, warmup_steps=max(self.recipe.optim.warmup_steps, 1),
                            out_file=out / "health.jsonl")
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
        if rows.has_text and teacher.has_text and not self._text_from_image:
            tokenizers["teacher"] = teacher.tokenize
        if rows.has_text and student.text is not None and (teacher.has_text or self._text_from_image):
            tokenizers["student"] = student.tokenize
        dataset = PairDataset(rows, views, r.data.augment, r.data.crop_scale, r.train.seed, image_reader(r.data),
                              flip=r.data.flip)
        words = tokens.syntax_annotator(r.train.schedule, student.text if "student" in tokenizers else None)
        return dataset, make_collate(tokenizers, words)

    def _cached_data(self, rows: Rows, image_keys, text_keys, student):
        from .cache import CachedPairDataset, cached_collate

        r = self.recipe
        dataset = CachedPairDataset(rows, image_keys, text_keys, self._cache,
                                    student.preprocess if student.image is not None else None,
                                    r.data.augment, r.train.seed, image_reader(r.data))
        tokenizers = {"student": student.tokenize} if student.text is not None and rows.has_text else {}
        words = tokens.syntax_annotator(r.train.schedule, student.text if tokenizers else None)
        return dataset, cached_collate(self._cache, make_collate(tokenizers, words))


class DistillStep(nn.Module):
    """Student + losses as one module whose forward is the loss, so that a DDP-wrapped copy
    synchronises gradients; the frozen teacher is held outside the module's parameters."""

    def __init__(self, teacher, student, loss: DistillLoss, text_from_image: bool = False):
        super().__init__()
        self.student = student
        self.loss = loss
        self._teacher = [teacher]  # a list: not registered, never trained or checkpointed
        self.text_from_image = text_from_image  # a caption's target is its image's embedding
        self.stage, self.generator = None, None  # the schedule's stage (fewer tokens), set by the loop each step

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
        if self.text_from_image:
            e.t_txt = e.t_img
        st, gen = self.stage, self.generator
        if "student" in pix:  # targets stay the teacher's full view: fewer tokens only for the student
            e.s_img = tokens.image_features(self.student, pix["student"], st and st.image_tokens, gen)
        if "student" in batch["tokens"]:
            e.s_txt = tokens.text_features(self.student, batch["tokens"]["student"], st and st.text_tokens, gen,
                                           batch.get("token_priority"))
        return self.loss(e)

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.loss.extra_tensors()

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.loss.load_extra_tensors(state)

    @property
    def loss_device(self) -> torch.device:
        return next(self.student.parameters()).device


def _token_lengths(student, captions: list) -> list[int]:
    """Each caption's token count under the student's own tokenizer (``data.group_by_length``)."""
    out: list[int] = []
    for i in range(0, len(captions), 4096):
        chunk = [c or "" for c in captions[i:i + 4096]]
        out += student.tokenize(chunk)["attention_mask"].sum(1).tolist()
    return out


def _data_hint(r: Recipe, images: bool, cached: bool) -> str:
    """What would make this run's loading faster (said once by the loop when loading is slow)."""
    hints = []
    if images and not r.data.packed:
        hints.append("a packed store (`distill data pack DATA --out PACK`, then data.packed=PACK): no JPEG decoding")
    if not cached:
        hints.append("a teacher cache (`distill cache build`, then cache.dir=DIR): the teacher runs once, not every step")
    return " or ".join(hints)


def _check_image_size(student, image_size: int | None) -> None:
    if image_size is None or student.image is None or student.preprocess.image_size == image_size:
        return
    pe = getattr(student.image.trunk, "patch_embed", None)
    fixed = getattr(pe, "img_size", None)
    if fixed is not None and not getattr(pe, "dynamic_img_size", False) and tuple(fixed)[-1] != image_size:
        raise RecipeError(f"data.image_size: {image_size}, but this ViT student was built for {tuple(fixed)[-1]} px; "
                          f"create it with create_student(..., image_size={image_size})")
    p = student.image.preprocess
    from .transforms import PreprocessCfg

    student.image.preprocess = PreprocessCfg(image_size, p.mean, p.std, p.interpolation, p.resize_mode)
