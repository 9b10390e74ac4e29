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
import torch.nn.functional as F
from torch import nn

from ._imports import require
from .config import Recipe, apply_options
from .data import PairDataset, as_rows, make_collate
from .losses import EmbeddingQueue
from .trainer import FitResult, TrainLoop, image_reader, make_loader_factory
from .transforms import normalize

log = logging.getLogger(__name__)
LOCKS = ("none", "text", "image", "lora")


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """Stable ids of caption strings: equal captions are positives of each other."""
    return torch.tensor([zlib.crc32(c.encode("utf-8")) for c in captions], dtype=torch.long)


def clip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor | None = None,
              queue: tuple[str, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Symmetric CLIP InfoNCE between paired image and text embeddings (normalised here).

    ``ids``: one id per pair; pairs with the same id (the same caption, as with class prompts) are
    all positives: the loss is -log of the softmax mass on the positives, not false negatives.
    ``queue``: ``(side, embeddings, ids)`` of past, frozen ``side`` ("image" or "text") embeddings,
    added as extra columns (negatives, or positives where ids match) for the other side's rows."""
    img, txt = F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1)
    scale = logit_scale.exp().clamp(max=100)
    n = len(img)
    ids = ids.to(img.device) if ids is not None else torch.arange(n, device=img.device)

    def ce(rows, cols, col_ids):
        logits = scale * rows @ cols.t()
        positive = ids[:, None] == col_ids[None, :]
        return (logits.logsumexp(-1) - logits.masked_fill(~positive, float("-inf")).logsumexp(-1)).mean()

    cols_txt, ids_txt, cols_img, ids_img = txt, ids, img, ids
    if queue is not None and len(queue[1]):
        side, q, q_ids = queue
        q, q_ids = q.to(img.device), q_ids.to(img.device)
        if side == "text":
            cols_txt, ids_txt = torch.cat([txt, q]), torch.cat([ids, q_ids])
        else:
            cols_img, ids_img = torch.cat([img, q]), torch.cat([ids, q_ids])
    return (ce(img, cols_txt, ids_txt) + ce(txt, cols_img, ids_img)) / 2


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
        self.register_buffer("text_table", text_table[1] if text_table else None, persistent=False)

    def forward(self, batch):
        model, lock = self.model, self.lock
        frozen = {"text": model.text, "image": model.image}.get(lock)
        if frozen is not None:
            frozen.eval()  # no dropout / statistics updates in the locked tower
        dev = self.loss.logit_scale.device
        pix = normalize(batch["views"]["model"].to(dev, non_blocking=True), model.preprocess)
        with torch.set_grad_enabled(lock != "image"):
            img = model.image_features(pix)
        if self.text_table is not None:
            txt = self.text_table[torch.tensor([self._text_rows[c] for c in batch["captions"]], device=dev)]
        else:
            with torch.set_grad_enabled(lock != "text"):
                txt = model.text_features(batch["tokens"]["model"])
        ids = caption_ids(batch["captions"]).to(dev)
        side = {"text": "text", "image": "image"}.get(lock)
        loss = clip_loss(img, txt, self.loss.logit_scale, ids, self.queue.get(side) if self.queue else None)
        if self.queue is not None:
            self.queue.push(txt if side == "text" else img, ids)
        return loss, {"clip": float(loss.detach()), "temperature": float(1 / self.loss.logit_scale.detach().exp())}


def _linear_names(module: nn.Module) -> list[str]:
    """Names of the Linear layers of a tower trunk (Conv2d for CNNs that have none)."""
    # nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would be ignored
    inside_mha = {f"{n}.out_proj" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in module.named_modules() if isinstance(m, kind) and n and n not in inside_mha]
        if names:
            return names
    raise ValueError("no Linear or Conv2d layer to put LoRA adapters on")


def add_lora(model, towers: str = "both", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: Sequence[str] = ()) -> list[str]:
    """Wrap the trunk of each chosen tower with peft LoRA adapters; freeze every base weight.
    Returns the names of the trainable parameters (adapters, projection heads)."""
    peft = require("peft", "tune.lock=lora")
    chosen = {"both": ("image", "text"), "image": ("image",), "text": ("text",)}.get(towers)
    if chosen is None:
        raise ValueError(f"tune.lora_towers: {towers!r} is not one of image, text, both")
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
            raise ValueError(f"tune.lock: {t.lock!r} is not one of {LOCKS}")
        if t.queue and t.lock not in ("text", "image"):
            raise ValueError("tune.queue: a queue of negatives needs a locked tower (tune.lock=text or image)")
        if model is None:
            from .students import create_student

            kwargs = dict(self.recipe.student.kwargs)
            model = create_student(self.recipe.student.name, embed_dim=kwargs.pop("embed_dim", t.embed_dim), **kwargs)
        if model.image is None or model.text is None:
            raise ValueError("Tuner needs a two-tower model (an image and a text tower)")
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
        rows = as_rows(data if data is not None else r.data.train,
                       image_column=r.data.image_column, caption_column=r.data.caption_column)
        keep = [i for i, (p, c) in enumerate(zip(rows.images, rows.captions)) if p and c]
        if not keep:
            raise ValueError(f"{rows.source}: tuning needs image-caption pairs")
        if len(keep) < len(rows):
            log.warning("%s: %d rows without an image or a caption are left out", rows.source, len(rows) - len(keep))
            rows = rows.subset(keep)
        frozen = {"text": model.text, "image": model.image}.get(t.lock)
        if frozen is not None:
            frozen.requires_grad_(False)
        if t.lock == "lora":
            trainable = add_lora(model, t.lora_towers, t.lora_rank, t.lora_alpha, t.lora_dropout, t.lora_targets)
            log.info("LoRA: %d trainable tensors", len(trainable))
        table = self._text_table(rows.captions) if t.lock == "text" else None
        dataset = PairDataset(rows, {"model": model.preprocess}, r.data.augment, r.data.crop_scale, r.train.seed,
                              image_reader(r.data))
        collate = make_collate({} if table else {"model": model.tokenize})
        step_module = TuneStep(model, _Temperature(t.init_temperature), t.lock, t.queue, table)

        pin = torch.cuda.is_available() and not r.train.cpu
        loop = TrainLoop(r, step_module,
                         make_loader_factory(dataset, collate, r.train.batch_size, r.train.seed, r.data.num_workers, pin))
        history, steps = loop.run()
        if t.lock == "lora":
            merge_lora(model)
        model_dir = Path(r.train.output_dir) / "model"
        if loop.is_main:
            model.cpu().eval().save(model_dir)
        return FitResult(model_dir.parent, history, model, model_dir, steps, {"samples_per_s": loop.samples_per_s})
