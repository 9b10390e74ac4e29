"""Distillation: ``Distiller(teacher, student).fit(data)`` trains a student onto a frozen teacher's embeddings.

The teacher side (a live teacher, or its cache) comes from ``cache.targets``; the batches from
``pipeline.build_pipeline``; the steps from ``loop.TrainLoop``. What a run trains on is exactly what its
recipe, data and teacher say: rows that cannot be used are left out with a reason (``skipped.jsonl``), a
cache is checked against the named teacher before it is read, and a teacher that is not named is never
loaded to fill rows a cache lacks.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import dist, tokens
from ._compat import forward
from .cache.targets import DEFAULT_TEACHER, CachedTeacher, Targets, targets_for  # noqa: F401  (DEFAULT_TEACHER too)
from .config import Recipe, apply_options
from .data import Rows, as_rows, load_parallel
from .errors import DataError, DataNotFoundError, FileFormatError, MissingFileError, RecipeError, UnknownNameError
from .loop import FitResult, TrainLoop
from .losses import DistillLoss, Embeddings
from .optim import seed_everything
from .pipeline import build_pipeline
from .run import check_output_dir, provenance, recipe_inputs, run_identity, run_inputs
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

    def build(self) -> tuple[Targets, Any]:
        """The teacher side (a live teacher or its cache: ``cache.targets``) and the student, built by name
        from the recipe where needed."""
        r = self.recipe
        targets = targets_for(self._teacher, r, self._load_teacher, text=r.data.text_target != "image")
        return targets, self._create_student(targets.embed_dim)

    def fit(self, data: Any = None) -> FitResult:
        """Train; ``data``: a file/folder path or Rows (default: the recipe's ``data.train``)."""
        r = self.recipe
        targets, student = self.build()
        source = data if data is not None else r.data.train
        rows = self._rows(source, data is None)
        self._check(rows, targets, student)
        inputs = {**recipe_inputs(r), **run_inputs(source, rows, targets.teacher, getattr(targets, "service", None))}
        check_output_dir(Path(r.train.output_dir), inputs, r.train.overwrite)  # before any work: a cache build takes long
        pipe = build_pipeline(rows, r, student, targets, hold_out=True)
        step = DistillStep(targets, student, DistillLoss(r.loss.weights, r.loss.kwargs),
                           text_from_image=r.data.text_target == "image")
        teacher_id = {k: v for k, v in targets.identity.items() if k != "path"}  # a moved teacher is the same
        run = run_identity(r, teacher=teacher_id, student=student.config(), data=pipe.fingerprint)
        loop = TrainLoop(r, step, pipe.make_loader, run=run, rows=pipe.train, inputs=inputs,
                         data_hint=_data_hint(r, rows.has_images, isinstance(targets, CachedTeacher)))
        loop.claim()  # before anything is written into the output folder
        out = Path(r.train.output_dir)
        loop.skips = pipe.skip_log(out / "skipped.jsonl", write=dist.is_main(), resume=loop.resume_from is not None)
        if len(pipe.held) and dist.is_main():  # the main process checks the held-out slice and writes health.jsonl
            health = self._health(pipe, targets, loop.skips)
            loop.hooks = [lambda s: health(student, s) if s % r.train.health_every == 0 else None]
        history, steps = loop.run()
        student.teacher_identity = targets.identity
        student.provenance = provenance(run, pipe.train, len(pipe.held), steps, source)
        if loop.is_main:
            student.cpu().eval().save(out / "student")
        return FitResult(out, history, student, out / "student", steps,
                         {"samples_per_s": loop.samples_per_s, "skipped": loop.skips.count, "timing": loop.timing})

    def _create_student(self, embed_dim: int):
        r, student = self.recipe, self._student if self._student is not None else self.recipe.student.name
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
        return student

    def _load_teacher(self, name: str):
        from .teachers import load_teacher

        r = self.recipe
        try:
            return load_teacher(name, pretrained=r.teacher.pretrained, **r.teacher.kwargs)
        except (UnknownNameError, MissingFileError, FileFormatError) as e:
            raise RecipeError(f"teacher.name: {e}") from None

    def _rows(self, source: Any, from_recipe: bool) -> Rows:
        """The training rows: parallel sentences (``data.parallel_source``) or any data source."""
        r = self.recipe
        if source is None or (isinstance(source, str) and not source):
            raise RecipeError("data.train: no training data: pass fit(data) or set data.train")
        try:
            if r.data.parallel_source and not isinstance(source, Rows):
                return load_parallel(source, r.data.parallel_source, r.data.parallel_targets,
                                     r.data.parallel_keep_source)
            return as_rows(source, image_column=r.data.image_column, caption_column=r.data.caption_column)
        except DataNotFoundError as e:
            if not from_recipe:
                raise
            raise DataNotFoundError(f"data.train: {e} (relative paths are read from {os.getcwd()})") from None

    def _check(self, rows: Rows, targets: Targets, student: Any) -> None:
        """Every combination that cannot work stops here, before any data is read or any step is run."""
        r = self.recipe
        if r.data.group_by_length and student.text is None:
            raise RecipeError("data.group_by_length: batches captions by their token length; this student has no "
                              "text tower (set it to false)")
        if student.image is not None and not rows.has_images:
            raise DataError(f"{rows.source}: the student has an image tower but the data has no images")
        if student.image is None and not rows.has_text:
            raise DataError(f"{rows.source}: the student is text-only but {rows.no_text()}")
        text_from_image, who = r.data.text_target == "image", targets.describe()
        if text_from_image and not (rows.has_images and rows.has_text):
            why = rows.no_text() if rows.has_images else "it has no images"
            raise RecipeError("data.text_target: image learns captions onto their images' embeddings; the data "
                              f"({rows.source}) needs images and captions, and {why}")
        if text_from_image and not targets.has_image:
            raise RecipeError(f"data.text_target: image learns captions onto the teacher's image embeddings, and {who} "
                              "has no image tower: use data.text_target: caption")
        if student.image is not None and not targets.has_image:
            raise RecipeError(f"student.name: the student has an image tower and {who} has none (it reads text "
                              "only): distil a text student, or name a teacher with an image tower")
        if student.text is not None and not text_from_image and not targets.has_text:
            raise RecipeError(f"student.name: the student has a text tower and {who} has none: distil an image "
                              "student, or learn captions onto images with data.text_target: image")
        tokens.check_schedule(student, r.train.schedule)

    def _health(self, pipe, targets: Targets, skips):
        """A HealthCheck with the teacher's embeddings of the held-out slice (from the cache when training
        from one); it warns about the teacher itself right away."""
        from .data import usable_image
        from .eval import caption_pairs
        from .health import HealthCheck

        held, keys = pipe.held, pipe.held_keys
        problems = {p: usable_image(p) for p in dict.fromkeys(x for x in held.images if x)}
        ok = [i for i, p in enumerate(held.images) if not (p and problems[p])]
        for i in sorted(set(range(len(held))) - set(ok)):
            skips.add(held, i, problems[held.images[i]])
        held = held.subset(ok)
        images, texts, _ = caption_pairs(held)
        image_keys = text_keys = None
        if keys is not None:
            key_of_image = dict(zip(held.images, [keys[0][i] for i in ok]))
            key_of_text = dict(zip(held.captions, [keys[1][i] for i in ok]))
            image_keys, text_keys = [key_of_image[p] for p in images], [key_of_text[c] for c in texts]
        t_img, t_txt = targets.embed(images, texts, image_keys, text_keys)
        check = HealthCheck(held, t_img, t_txt, warmup_steps=max(self.recipe.optim.warmup_steps, 1),
                            out_file=Path(self.recipe.train.output_dir) / "health.jsonl")
        check.report(0, check.teacher_alarms())
        return check


class DistillStep(nn.Module):
    """Student + losses as one module whose forward is the loss, so that a DDP-wrapped copy synchronises
    gradients; the teacher side (``targets``: a live teacher or the cache) is held outside its parameters."""

    def __init__(self, targets: Targets, student: nn.Module, loss: DistillLoss, text_from_image: bool = False):
        super().__init__()
        self.student = student
        self.loss = loss
        self._targets = [targets]  # a list: not registered, never trained or checkpointed
        self.text_from_image = text_from_image  # a caption's target is its image's embedding
        self.stage, self.generator = None, None  # the schedule's stage (fewer tokens), set by the loop each step

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_of(self.embed(batch))

    def embed(self, batch: dict[str, Any]) -> Embeddings:
        """The batch's teacher targets and the student's embeddings of this process's rows (no collective)."""
        dev = next(self.student.parameters()).device
        targets = self._targets[0]
        pre = {"student": self.student.preprocess, "teacher": getattr(targets.teacher, "preprocess", None)}
        pix = {k: normalize(v.to(dev, non_blocking=True), pre[k]) for k, v in batch.get("views", {}).items()}
        e = Embeddings()
        e.t_img, e.t_txt = targets.batch(batch, pix, dev)
        if self.text_from_image:
            e.t_txt = e.t_img
        st, gen = self.stage, self.generator
        if "student" in pix:  # targets stay the teacher's full view: fewer tokens only for the student
            e.s_img = tokens.image_features(self.student, pix["student"], st and st.image_tokens, gen)
        if "student" in batch.get("tokens", {}):
            e.s_txt = tokens.text_features(self.student, batch["tokens"]["student"], st and st.text_tokens, gen,
                                           batch.get("token_priority"))
        return e

    def loss_of(self, e: Embeddings) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted losses (contrastive terms gather every process's rows)."""
        return self.loss(e)

    @property
    def model(self) -> nn.Module:
        """The trained model (every step module names it ``model``)."""
        return self.student

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.loss.extra_tensors()

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.loss.load_extra_tensors(state)


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


__getattr__ = forward(__name__, {  # moved: importable from here for one more release
    "make_optimizer": "distill.optim:make_optimizer", "lr_at": "distill.optim:lr_at",
    "seed_everything": "distill.optim:seed_everything", "NonFiniteLossError": "distill.errors:NonFiniteLossError",
    "run_identity": "distill.run:run_identity", "data_fingerprint": "distill.run:data_fingerprint",
    "make_loader_factory": "distill.data.sampler:make_loader_factory",
    "image_reader": "distill.data.packed:image_reader"})
