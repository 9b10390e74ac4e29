"""Contrastive tuning of a two-tower model (CLIP loss, learnable temperature) before distilling.

Lock modes (``tune.lock``):

* ``text`` -- LiT (Zhai et al., 2022): the text tower is frozen, the image tower trains. The
  frozen tower's embeddings are computed once per distinct caption, not every step.
* ``image`` -- the image tower is frozen and the text tower trains into its space.
* ``lora`` -- peft LoRA adapters on the Linear layers of the chosen towers; only adapters, the
  projection heads and the temperature train; adapters are merged into the weights on save.
* ``none`` -- both towers train.

The result is a folder (safetensors + config + tokenizer) that ``load_teacher`` loads.
"""
from __future__ import annotations

import logging
import math
import zlib
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from . import dist
from ._imports import require
from .config import LOCKS, LORA_TOWERS, Recipe, apply_options
from .data import PairDataset, SkipLog, as_rows, make_collate, split_usable
from .dist import gather_rows
from .errors import DataError, RecipeError, UnknownNameError
from .loop import (FitResult, TrainLoop, data_fingerprint, image_reader, make_loader_factory, run_identity,
                   seed_everything)
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


class TuneStep(nn.Module):
    """Two-tower model + temperature; forward is the CLIP loss (one module for DDP).

    ``text_table``: (caption -> row, [rows, D] embeddings) of a locked text tower, computed once."""

    def __init__(self, model, temperature: _Temperature, lock: str, queue: int = 0,
                 text_table: tuple[dict[str, int], torch.Tensor] | None = None):
        super().__init__()
        self.model = model
        self.loss = temperature
        self.lock = lock
        self.queue = EmbeddingQueue(queue) if queue > 0 else None
        self._text_rows = text_table[0] if text_table else None
        # a plain attribute, not a buffer: DDP would broadcast a buffer from the main process every step
        self._text_table = [text_table[1]] if text_table else None

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        return self.queue.state("queue.") if self.queue is not None else {}

    def load_extra_tensors(self, state: dict[str, torch.Tensor]) -> None:
        if self.queue is not None:
            self.queue.load(state, "queue.")

    def forward(self, batch):
        model, lock = self.model, self.lock
        frozen = {"text": model.text, "image": model.image}.get(lock)
        if frozen is not None:
            frozen.eval()  # no dropout / statistics updates in the locked tower
        dev = self.loss.logit_scale.device
        pix = normalize(batch["views"]["model"].to(dev, non_blocking=True), model.preprocess)
        with torch.set_grad_enabled(lock != "image"):
            img = model.image_features(pix)
        if self._text_table is not None:
            if self._text_table[0].device != dev:
                self._text_table[0] = self._text_table[0].to(dev)
            txt = self._text_table[0][torch.tensor([self._text_rows[c] for c in batch["captions"]], device=dev)]
        else:
            with torch.set_grad_enabled(lock != "text"):
                txt = model.text_features(batch["tokens"]["model"])
        ids = caption_ids(batch["captions"]).to(dev)
        side = {"text": "text", "image": "image"}.get(lock)
        loss = clip_loss(img, txt, self.loss.logit_scale, ids, self.queue.get(side) if self.queue else None)
        if self.queue is not None:  # every process pushes every process's rows: one queue
            self.queue.push(gather_rows(txt if side == "text" else img)[0], gather_rows(ids)[0])
        return loss, {"clip": float(loss.detach()), "temperature": float(1 / self.loss.logit_scale.detach().exp())}


def _linear_names(module: nn.Module) -> list[str]:
    """Names of the Linear layers of a tower trunk (Conv2d for CNNs that have none)."""
    # nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would be ignored
    inside_mha = {f"{n}.out_proj" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in module.named_modules() if isinstance(m, kind) and n and n not in inside_mha]
        if names:
            return names
    raise RecipeError("tune.lock: lora needs a Linear or Conv2d layer to put adapters on; this tower has none")


def add_lora(model, towers: str = "both", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = ()) -> list[str]:
    """Wrap the trunk of each chosen tower with peft LoRA adapters; freeze every base weight.
    Returns the names of the trainable parameters (adapters, projection heads)."""
    peft = require("peft", "tune.lock=lora")
    chosen = {"both": ("image", "text"), "image": ("image",), "text": ("text",)}.get(towers)
    if chosen is None:
        raise RecipeError(f"tune.lora_towers: {towers!r} is not one of {', '.join(LORA_TOWERS)}")
    model.requires_grad_(False)
    for name in chosen:
        tower = getattr(model, name)
        attr = "trunk" if name == "image" else "encoder"
        inner = getattr(tower, attr)
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                              target_modules=list(targets) or _linear_names(inner))
        setattr(tower, attr, peft.get_peft_model(inner, cfg))
    for tower in (model.image, model.text):
        tower.proj.requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def merge_lora(model) -> None:
    """Fold LoRA adapters into the base weights (in place): a plain model, loadable without peft."""
    for tower, attr in ((model.image, "trunk"), (model.text, "encoder")):
        inner = getattr(tower, attr, None) if tower is not None else None
        if inner is not None and hasattr(inner, "merge_and_unload"):
            setattr(tower, attr, inner.merge_and_unload())


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
        self.model = model

    def _text_table(self, captions: Sequence[str]) -> tuple[dict[str, int], torch.Tensor]:
        """Embed every distinct caption once with the locked text tower."""
        from tqdm.auto import tqdm

        unique = list(dict.fromkeys(c for c in captions if c))
        text = self.model.text
        text.to("cuda" if torch.cuda.is_available() and not self.recipe.train.cpu else "cpu").eval()
        with torch.no_grad():
            emb = [self.model.encode_text(unique[i:i + 256]).float().cpu()
                   for i in tqdm(range(0, len(unique), 256), desc="locked text tower", unit="batch",
                                 disable=not self.recipe.train.progress)]
        text.cpu()
        return {c: i for i, c in enumerate(unique)}, torch.cat(emb)

    def fit(self, data: Any = None) -> FitResult:
        r, model, t = self.recipe, self.model, self.recipe.tune
        source = data if data is not None else r.data.train
        if source is None or (isinstance(source, str) and not source):
            raise RecipeError("data.train: no training data: pass fit(data) or set data.train")
        rows = as_rows(source, image_column=r.data.image_column, caption_column=r.data.caption_column)
        if not rows.has_images or not rows.has_text:
            raise DataError(f"{rows.source}: tuning needs image-caption pairs")
        keep, why = split_usable(rows, need_image=True, need_caption=True)
        skipped = [(rows, i, reason) for i, reason in why.items()]
        rows = rows.subset(keep)
        frozen = {"text": model.text, "image": model.image}.get(t.lock)
        if frozen is not None:
            frozen.requires_grad_(False)
        if t.lock == "lora":
            trainable = add_lora(model, t.lora_towers, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets)
            log.info("LoRA: %d trainable tensors", len(trainable))
        dataset = PairDataset(rows, {"model": model.preprocess}, r.data.augment, r.data.crop_scale, r.train.seed,
                              image_reader(r.data), flip=r.data.flip)
        pin = torch.cuda.is_available() and not r.train.cpu
        run = run_identity(r, model=model.config(), data=data_fingerprint(rows, progress=r.train.progress))
        loop = TrainLoop(r, None, make_loader_factory(dataset, None, r.train.batch_size, r.train.seed,
                                                      r.data.num_workers, pin), run=run, rows=rows)
        loop.claim()  # before anything is written into the output folder
        loop.skips = SkipLog(Path(r.train.output_dir) / "skipped.jsonl", write=dist.is_main(),
                             resume=loop.resume_from is not None)
        for rs, i, reason in skipped:
            loop.skips.add(rs, i, reason)
        if not len(rows):
            raise DataError(f"no usable image-caption rows left to tune on ({loop.skips.summary()})")
        table = self._text_table(rows.captions) if t.lock == "text" else None
        collate = make_collate({} if table else {"model": model.tokenize})
        loop.modules = TuneStep(model, _Temperature(t.init_temperature), t.lock, t.queue, table)
        loop.make_loader = make_loader_factory(dataset, collate, r.train.batch_size, r.train.seed,
                                               r.data.num_workers, pin)
        history, steps = loop.run()
        if t.lock == "lora":
            merge_lora(model)
        model_dir = Path(r.train.output_dir) / "model"
        if loop.is_main:
            model.cpu().eval().save(model_dir)
        return FitResult(model_dir.parent, history, model, model_dir, steps,
                         {"samples_per_s": loop.samples_per_s, "skipped": loop.skips.count})
