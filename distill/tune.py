"""Contrastive tuning of a two-tower model (CLIP loss, learnable temperature) before distilling.

Lock modes (``tune.lock``):

* ``text`` -- LiT (Zhai et al., 2022): the text tower is frozen, the image tower trains. The
  frozen tower's embeddings are computed once per distinct caption, not every step.
* ``image`` -- the image tower is frozen and the text tower trains into its space.
* ``lora`` -- peft LoRA adapters on the Linear layers of the chosen towers; only adapters, the
  projection heads and the temperature train; adapters are merged into the weights on save.
* ``both`` -- both trunks are frozen; only the two projection heads and the temperature train
  (locked-image-and-text tuning). Each image's trunk features (eval view) and each distinct
  caption's pooled features are computed once and kept in ``<output_dir>/features/``, so the
  steps cost only the heads: seconds on a CPU once the features exist.
* ``none`` -- both towers train.

``tune.unfreeze_last: N`` (with ``text``, ``image`` or ``both``) also trains the last N blocks of each
locked trunk (timm's fine-grained block groups; transformer layers of a text encoder). The locked
towers stay in eval mode (batch-norm statistics and dropout as pretrained), and they are run every
step instead of read from a table.

The result is a folder (safetensors + config + tokenizer) that ``load_teacher`` loads.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import dist, tokens
from .config import LOCKS, LORA_TOWERS, Recipe, apply_options
from .data import Rows, make_collate
from .dist import gather_rows
from .errors import RecipeError, UnknownNameError
from .features import FrozenTable, TableRows, image_table, read_tables, rows_of, table_rows, write_tables
from .loop import FitResult, TrainLoop
from .optim import seed_everything
from .pipeline import build_pipeline, image_caption_rows
from .progress import track
from .run import check_output_dir, provenance, recipe_inputs, run_identity, run_inputs
from .losses import EmbeddingQueue, clip_loss  # noqa: F401  (clip_loss: re-exported, used below)
from .transforms import normalize

log = logging.getLogger(__name__)


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """Stable ids of caption strings: equal captions are positives of each other."""
    return torch.tensor([zlib.crc32(c.encode("utf-8")) for c in captions], dtype=torch.long)


class _Temperature(nn.Module):
    def __init__(self, init: float):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / init)))


LOCKED = {"text": ("text",), "image": ("image",), "both": ("image", "text")}  # towers each lock mode freezes


class TuneStep(nn.Module):
    """Two-tower model + temperature; forward is the CLIP loss (one module for DDP).

    ``tables``: per side ("image", "text"), a FrozenTable that replaces running that tower."""

    def __init__(self, model, temperature: _Temperature, lock: str, queue: int = 0,
                 tables: dict[str, FrozenTable] | None = None):
        super().__init__()
        self.model = model
        self.loss = temperature
        self.lock = lock
        self.queue = EmbeddingQueue(queue) if queue > 0 else None
        # a plain attribute, not buffers: DDP would broadcast a buffer from the main process every step
        self._tables = dict(tables or {})
        self.stage, self.generator = None, None  # the schedule's stage (fewer tokens), set by the loop each step

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.queue.state("queue.") if self.queue is not None else {}

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if self.queue is not None:
            self.queue.load(state, "queue.")

    def _side(self, side: str, keys: Sequence[Any], run, dev: torch.device) -> torch.Tensor:
        table = self._tables.get(side)
        tower = getattr(self.model, side)
        if table is None:
            with torch.set_grad_enabled(any(p.requires_grad for p in tower.parameters())):
                return run()
        if table.values.device != dev:
            table.values = table.values.to(dev)
        rows = table.values[torch.tensor([table.rows[k] for k in keys], device=dev)]
        return tower.proj(rows) if table.head else rows

    def forward(self, batch):
        return self.loss_of(self.embed(batch))

    def embed(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, text embeddings, caption ids) of this process's rows (no collective)."""
        model, lock = self.model, self.lock
        for name in LOCKED.get(lock, ()):
            getattr(model, name).eval()  # no dropout / statistics updates in a locked tower
        dev = self.loss.logit_scale.device

        st, gen = self.stage, self.generator

        def image():
            return tokens.image_features(model, normalize(batch["views"]["student"].to(dev, non_blocking=True),
                                                          model.preprocess), st and st.image_tokens, gen)

        def text():
            return tokens.text_features(model, batch["tokens"]["student"], st and st.text_tokens, gen,
                                        batch.get("token_priority"))

        img = self._side("image", batch["index"].tolist(), image, dev)
        txt = self._side("text", batch["captions"], text, dev)
        return img, txt, caption_ids(batch["captions"]).to(dev)

    def loss_of(self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        """The CLIP loss over every process's rows (and the queue of past ones)."""
        img, txt, ids = parts
        side = {"text": "text", "image": "image"}.get(self.lock)
        loss = clip_loss(img, txt, self.loss.logit_scale, ids, self.queue.get(side) if self.queue else None)
        if self.queue is not None:  # every process pushes every process's rows: one queue
            self.queue.push(gather_rows(txt if side == "text" else img)[0], gather_rows(ids)[0])
        return loss, {"clip": float(loss.detach()), "temperature": float(1 / self.loss.logit_scale.detach().exp())}


@contextmanager
def without_head(tower: nn.Module) -> Iterator[nn.Module]:
    """``tower`` with its projection head replaced by the identity: its forward gives trunk features."""
    head, tower.proj = tower.proj, nn.Identity()
    try:
        yield tower
    finally:
        tower.proj = head


def add_lora(model, towers: str = "both", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = ()) -> list[str]:
    """LoRA adapters on the bodies of the chosen towers of a two-tower model (``TowerRoles.add_lora``), every
    base weight frozen. Returns the names of the trainable parameters (adapters, projection heads)."""
    chosen = {"both": ("image", "text"), "image": ("image",), "text": ("text",)}.get(towers)
    if chosen is None:
        raise RecipeError(f"tune.lora_towers: {towers!r} is not one of {', '.join(LORA_TOWERS)}")
    model.requires_grad_(False)
    for name in chosen:
        getattr(model, name).add_lora(rank, alpha, dropout, targets)
    for tower in model.towers().values():
        if tower.head is not None:
            tower.head.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model) -> None:
    """Fold LoRA adapters into the base weights (in place): a plain model, loadable without peft."""
    for tower in model.towers().values():
        tower.merge_lora()


def _features_key(model, data_id: str) -> str:
    """What frozen features depend on: the towers' config (preprocessing included), their weights, the data."""
    from .teachers.base import state_hash

    weights = [state_hash(tower.backbone) for tower in (model.image, model.text)]
    key = {"model": model.config(), "data": data_id, "weights": weights}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


class Tuner:
    """Train a two-tower Student contrastively on image-caption pairs.

    Args:
        model: a two-tower Student (``create_student("vit_tiny+bert_small", embed_dim=256)``), or
            None to build ``recipe.student.name`` with ``tune.embed_dim``.
        recipe: a Recipe; ``options`` (``lock``, ``lr``, ``max_steps``, ``output_dir``, ...) override it.

    Example:
        >>> model = create_student("timm:resnet18+hf:minilm", embed_dim=384)
        >>> Tuner(model, lock="text", max_steps=2000, output_dir="runs/lit").fit("train.csv")
    """

    def __init__(self, model: Any = None, *, recipe: Recipe | None = None, **options: Any):
        self.recipe = apply_options(recipe or Recipe(), options)
        t = self.recipe.tune
        if t.lock not in LOCKS:
            raise RecipeError(f"tune.lock: {t.lock!r} is not one of {LOCKS}")
        if t.queue and t.lock not in ("text", "image"):
            raise RecipeError("tune.queue: a queue of negatives needs a locked tower (tune.lock=text or image)")
        if t.unfreeze_last and t.lock not in LOCKED:
            raise RecipeError(f"tune.unfreeze_last: {t.unfreeze_last} needs locked towers (tune.lock=text, image or "
                              f"both), not tune.lock={t.lock}")
        if model is None:
            from .students import create_student

            kwargs = dict(self.recipe.student.kwargs)
            seed_everything(self.recipe.train.seed)  # the same recipe and seed give the same initial model
            try:
                model = create_student(self.recipe.student.name, embed_dim=kwargs.pop("embed_dim", t.embed_dim),
                                       **kwargs)
            except UnknownNameError as e:
                raise RecipeError(f"student.name: {e}") from None
        if model.image is None or model.text is None:
            raise RecipeError("student.name: tuning needs a two-tower model (an image and a text tower), e.g. "
                              "resnet18+hf:minilm")
        headless = [n for n, tower in model.towers().items() if tower.head is None]
        if t.lock == "both" and headless:
            raise RecipeError(f"tune.lock: both trains only the projection heads, and the {headless[0]} tower has none "
                              "(an open_clip text tower keeps its own); use tune.lock=text or image")
        self.model = model

    def _device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() and not self.recipe.train.cpu else "cpu")

    def _text_table(self, captions: Sequence[str], through_head: bool = True) -> FrozenTable:
        """Embed every distinct caption once with the locked text tower (``through_head=False``: its pooled
        trunk features, to which the trained head applies)."""
        unique = list(dict.fromkeys(c for c in captions if c))
        text = self.model.text
        text.to(self._device()).eval()
        with torch.no_grad(), (nullcontext() if through_head else without_head(text)):
            emb = [self.model.text_features(unique[i:i + 256]).float().cpu()
                   for i in track(range(0, len(unique), 256), desc="locked text tower", unit="batch",
                                  enabled=self.recipe.train.progress)]
        text.cpu()
        emb = torch.cat(emb)
        if through_head:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        return FrozenTable({c: i for i, c in enumerate(unique)}, emb, head=not through_head)

    def _image_table(self, rows: Rows) -> tuple[FrozenTable, dict[int, str]]:
        """Trunk features of each distinct image (eval view) once; returns the table (dataset row -> row of
        features) and the rows whose image could not be read."""
        r, image = self.recipe, self.model.image
        dev = self._device()
        image.to(dev).eval()
        if r.train.channels_last:
            image.to(memory_format=torch.channels_last)  # CNN trunks: faster convolutions, the same features
        table, bad = image_table(rows, image.preprocess, image.trunk, dev, r.data.num_workers, r.data.packed,
                                 progress=r.train.progress, desc="locked image tower")
        image.cpu()
        return FrozenTable(table.rows, table.values, head=True), bad

    def _frozen_tables(self, rows: Rows, data_id: str) -> tuple[dict[str, FrozenTable], dict[int, str]]:
        """Both locked towers' tables, read from ``<output_dir>/features/`` when they were computed for this
        model and data (the key hashes the towers' weights, config and the data fingerprint)."""
        key = _features_key(self.model, data_id)
        path = Path(self.recipe.train.output_dir) / "features" / "frozen.safetensors"
        captions = list(dict.fromkeys(c for c in rows.captions if c))
        stored = read_tables(path, key)
        if stored is not None:
            t, bad = stored
            return {"image": FrozenTable(rows_of(t["image_rows"]), t["image"], True),
                    "text": FrozenTable({c: i for i, c in enumerate(captions)}, t["text"], True)}, bad
        image, bad = self._image_table(rows)
        text = self._text_table(captions, through_head=False)
        write_tables(path, key, {"image": image.values, "text": text.values,
                                 "image_rows": table_rows(image, len(rows))}, bad)
        return {"image": image, "text": text}, bad

    def fit(self, data: Any = None) -> FitResult:
        r, model, t = self.recipe, self.model, self.recipe.tune
        source, rows = image_caption_rows(r, data, "tuning needs")
        if r.data.group_by_length:
            raise RecipeError("data.group_by_length: batches by caption length for distillation (distill fit); "
                              "contrastive tuning takes its negatives from random batches: set it to false")
        tokens.check_schedule(model, r.train.schedule)
        inputs = {**recipe_inputs(r), **run_inputs(source, rows)}
        check_output_dir(Path(r.train.output_dir), inputs, r.train.overwrite)
        self._lock()
        pipe = build_pipeline(rows, r, model)
        run = run_identity(r, model=model.config(), data=pipe.fingerprint)
        loop = TrainLoop(r, None, pipe.make_loader, run=run, rows=pipe.train, inputs=inputs)
        loop.claim()  # before anything is written into the output folder
        loop.skips = pipe.skip_log(Path(r.train.output_dir) / "skipped.jsonl", write=dist.is_main(),
                                   resume=loop.resume_from is not None)
        tables = self._tables(pipe)
        loop.modules = TuneStep(model, _Temperature(t.init_temperature), t.lock, t.queue, tables)
        loop.make_loader = pipe.make_loader
        history, steps = loop.run()
        if t.lock == "lora":
            merge_lora(model)
        model.provenance = provenance(run, pipe.train, len(pipe.held), steps, source)
        model_dir = Path(r.train.output_dir) / "model"
        if loop.is_main:
            model.cpu().eval().save(model_dir)
        return FitResult(model_dir.parent, history, model, model_dir, steps,
                         {"samples_per_s": loop.samples_per_s, "skipped": loop.skips.count, "timing": loop.timing})

    def _lock(self) -> None:
        """Freeze what ``tune.lock`` says (the towers carry the how: ``TowerRoles``)."""
        t, model = self.recipe.tune, self.model
        for name in LOCKED.get(t.lock, ()):
            getattr(model, name).lock(head=t.lock == "both", unfreeze_last=t.unfreeze_last)  # both: the heads train
        if t.lock == "lora":
            trainable = add_lora(model, t.lora_towers, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets)
            log.info("LoRA: %d trainable tensors", len(trainable))

    def _tables(self, pipe) -> dict[str, FrozenTable]:
        """Locked towers read from tables computed once (and the pipeline's batches with them)."""
        t = self.recipe.tune
        if t.unfreeze_last or t.lock not in ("both", "text"):
            return {}
        if t.lock == "both":  # only the heads train: read both towers from tables
            tables, bad = self._frozen_tables(pipe.train, pipe.fingerprint)
            pipe.with_dataset(TableRows(pipe.train, bad), make_collate({}))
            return tables
        pipe.with_dataset(pipe.dataset, make_collate({}))  # the text side comes from its table: no tokens
        return {"text": self._text_table(pipe.train.captions)}
