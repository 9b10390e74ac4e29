"""Adapter training (``distill adapt``): a frozen tower's features, computed once (or read from the teacher
cache), teach a projector (and optional LoRA) to caption into a frozen language model, through the loop every
run shares (``TrainLoop``: accumulation, mixed precision, checkpoints, exact resume, several processes)."""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import dist
from ..config import Recipe, apply_options
from ..data import make_collate
from ..errors import DataError, RecipeError
from ..features import (FrozenTable, TableRows, image_table, read_tables, rows_of, stored_image_table, table_rows,
                        write_tables)
from ..loop import FitResult, TrainLoop
from ..optim import seed_everything
from ..pipeline import build_pipeline, image_caption_rows
from ..run import check_output_dir, provenance, recipe_inputs, run_identity, run_inputs
from .adapter import Projector
from .lm import load_lm
from .model import VisionLanguageModel
from .tower import VisionTower

log = logging.getLogger(__name__)


class AdapterStep(nn.Module):
    """One step of adapter training: the rows' features from the table, the caption loss of the VLM. Its
    state (checkpoints) is the trained part only: the frozen LM is not written 500 MB at a time."""

    def __init__(self, model: VisionLanguageModel, table: FrozenTable, noise: float = 0.0):
        super().__init__()
        self.model = model
        self.noise = noise if model.projector.features == "pooled" else 0.0
        self._table = table  # a plain attribute: no state, never broadcast
        self._saved = ["model." + n for n in model.trainable_names()]
        if not self._saved:
            raise RecipeError("vlm: nothing trains (the projector is frozen)")

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.loss_of(self.embed(batch))

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy of this process's answer tokens, their count): no collective."""
        self.model.lm.eval()  # frozen (LoRA aside): no dropout, as in a locked tower
        t = self._table
        feats = t.values[torch.tensor([t.rows[i] for i in batch["index"].tolist()])]
        if self.noise and self.training:
            feats = torch.nn.functional.normalize(feats + self.noise * torch.randn_like(feats), dim=-1)
        return self.model.loss(feats, batch["captions"], reduction="sum")

    def loss_of(self, parts: tuple[torch.Tensor, int]) -> tuple[torch.Tensor, dict[str, float]]:
        """The mean over every process's answer tokens (captions differ in length: a per-process mean would
        weigh a token of a short batch more), scaled so that the gradient average over processes is that mean."""
        total, tokens = parts
        per_process = dist.mean(torch.tensor([float(tokens)], device=dist.collective_device(total.device)),
                                "the answer tokens of the step")
        loss = total / per_process.to(total.device).clamp_min(1.0)
        return loss, {"caption_ce": float(loss.detach()), "answer_tokens": float(tokens)}

    def state_dict(self, *args: Any, **kwargs: Any) -> "OrderedDict[str, torch.Tensor]":
        keep = set(self._saved)
        return OrderedDict((k, v) for k, v in super().state_dict(*args, **kwargs).items() if k in keep)

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        missing = sorted(set(self._saved) - set(state))
        if strict and missing:
            raise RuntimeError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
        return super().load_state_dict(state, strict=False, assign=assign)


class AdapterTrainer:
    """Train an adapter that lets a frozen causal LM see through a frozen image tower.

    Args:
        tower: a VisionTower, or None to load ``vlm.tower``.
        lm, tokenizer: a causal LM and its tokenizer, or None to load ``vlm.lm``.
        recipe: a Recipe; ``options`` (``lm``, ``prefix_tokens``, ``max_steps``, ``output_dir``, ...) override it.

    Example:
        >>> AdapterTrainer(tower="runs/teacher/model", lm="HuggingFaceTB/SmolLM2-135M-Instruct",
        ...                max_steps=1000, output_dir="runs/vlm").fit("captions.csv")
    """

    def __init__(self, tower: Any = None, lm: Any = None, tokenizer: Any = None, *, recipe: Recipe | None = None,
                 **options: Any):
        if isinstance(tower, str):
            options["vlm.tower"], tower = tower, None
        if isinstance(lm, str):
            options["vlm.lm"], lm = lm, None
        self.recipe = apply_options(recipe or Recipe(), options)
        v = self.recipe.vlm
        if tower is None:
            if not v.tower:
                raise RecipeError("vlm.tower: name the frozen vision tower (a saved teacher or student folder)")
            tower = VisionTower.load(v.tower, v.features)
        elif tower.features != v.features:
            tower.features = v.features
        self.tower = tower
        # where the LM comes from, for the adapter's config (an object given: where load_lm read it, if it did)
        self.lm_source = {"lm": v.lm, "gguf_file": v.gguf_file, "chat_template": v.chat_template}
        if lm is None:
            lm, tokenizer = load_lm(v.lm, v.gguf_file, v.chat_template)
        elif tokenizer is None:
            raise RecipeError("vlm.lm: an LM object needs its tokenizer (AdapterTrainer(tower, lm, tokenizer))")
        else:
            self.lm_source = {"lm": str(getattr(lm, "name_or_path", "") or v.lm), "gguf_file": None,
                              "chat_template": v.chat_template}
        self.lm, self.tokenizer = lm, tokenizer

    def _device(self) -> torch.device:
        return torch.device("cuda" if torch.cuda.is_available() and not self.recipe.train.cpu else "cpu")

    def _model(self) -> VisionLanguageModel:
        v = self.recipe.vlm
        seed_everything(self.recipe.train.seed)  # the same recipe and seed give the same initial projector
        width = self.tower.width()
        projector = Projector(v.features, width, int(self.lm.config.hidden_size), v.projector_hidden,
                              v.prefix_tokens, v.merge)
        vision = {**self.tower.identity(), "path": str(self.tower.folder) if self.tower.folder else None}
        lora = {"rank": v.lm_lora, "alpha": v.lm_lora_alpha,
                "targets": list(v.lm_lora_targets) or ["q_proj", "v_proj"]} if v.lm_lora else None
        model = VisionLanguageModel(projector, self.lm, self.tokenizer, v.prompt, v.system, vision, self.lm_source,
                                    v.max_answer_tokens, lora)
        if v.init_adapter:
            self._start_from(model, v.init_adapter)
        return model

    def _start_from(self, model: VisionLanguageModel, folder: str) -> None:
        """``vlm.init_adapter``: a saved adapter's weights as the starting point (its tower must be readable as
        this one: the same space for pooled features; its LM the same)."""
        from ..errors import DistillError, ModelError
        from .adapter import check_lm, read_adapter
        from .lm import lm_identity
        from .tower import check_tower

        try:
            cfg, projector, lora = read_adapter(folder)
            check_tower(cfg["vision"], model.vision)
            check_lm(cfg["lm"], lm_identity(self.lm))
        except DistillError as e:
            raise ModelError(f"vlm.init_adapter: {e}") from None
        if projector.spec() != model.projector.spec():
            raise ModelError(f"vlm.init_adapter: {folder} has another projector ({projector.spec()}) than the recipe "
                             f"asks for ({model.projector.spec()}); set vlm.prefix_tokens / projector_hidden to its")
        theirs, mine = cfg.get("lora") or {}, model.lora or {}
        if (theirs.get("rank"), sorted(theirs.get("targets") or [])) != (mine.get("rank"),
                                                                          sorted(mine.get("targets") or [])):
            raise ModelError(f"vlm.init_adapter: {folder} has LoRA {theirs or 'none'}, the recipe asks for "
                             f"{mine or 'none'}; set vlm.lm_lora / vlm.lm_lora_targets to its")
        model.projector.load_state_dict(projector.state_dict())
        model.load_lora_state(lora)

    def features(self, rows: Any, data_id: str) -> tuple[FrozenTable, dict[int, str]]:
        """The tower's features of each distinct image once: from the teacher cache (``cache.dir``) when the tower
        is that cache's teacher and the cache has every photo, else run by the tower; kept in
        ``<output_dir>/features/`` under a key of the tower and the data (a resumed run reads them)."""
        r = self.recipe
        key = json.dumps({"tower": self.tower.identity(), "data": data_id}, sort_keys=True)
        path = Path(r.train.output_dir) / "features" / "vlm.safetensors"
        stored = read_tables(path, key)
        if stored is not None:
            return FrozenTable(rows_of(stored[0]["rows"]), stored[0]["values"]), stored[1]
        table, bad = self._from_cache(rows) or self._from_tower(rows)
        write_tables(path, key, {"values": table.values, "rows": table_rows(table, len(rows))}, bad)
        return table, bad

    def _from_cache(self, rows: Any) -> tuple[FrozenTable, dict[int, str]] | None:
        r, tower = self.recipe, self.tower
        if not r.cache.dir or tower.features != "pooled" or not Path(r.cache.dir).is_dir():
            return None
        from ..cache.dataset import lookup
        from ..cache.store import EmbeddingCache

        cache = EmbeddingCache.open(r.cache.dir, check_values=False)
        teacher = cache.manifest.get("teacher") or {}
        if teacher.get("weights") != tower.space() or tower.weights() == "unknown" or \
                getattr(tower.model, "teacher_identity", None):
            log.info("cache %s holds another tower's embeddings (%s): the tower %s encodes the photos", r.cache.dir,
                     teacher.get("name"), tower.name)
            return None
        found = lookup(rows, cache, progress=r.train.progress, text=False, image=True)
        if found.missing:
            log.info("cache %s lacks %d photos: the tower %s encodes them all", r.cache.dir, len(found.missing),
                     tower.name)
            return None
        keys = list(dict.fromkeys(k for i, k in enumerate(found.image_keys) if k and i not in found.skipped))
        values = cache.image_embeddings(keys, [0] * len(keys)).float()
        where = {k: j for j, k in enumerate(keys)}
        table = FrozenTable({i: where[k] for i, k in enumerate(found.image_keys) if k in where}, values)
        log.info("photo features of %d photos read from the cache %s", len(keys), r.cache.dir)
        return table, dict(found.skipped)

    def _from_tower(self, rows: Any) -> tuple[FrozenTable, dict[int, str]]:
        """Run by the tower; with ``cache.dir``, the photos it already encoded for any run are read from
        ``<cache.dir>/towers/`` (by content) and the new ones kept there."""
        r, tower = self.recipe, self.tower
        tower.model.to(self._device())
        opts = dict(device=self._device(), num_workers=r.data.num_workers, packed=r.data.packed,
                    progress=r.train.progress, desc=f"frozen tower {tower.name}")
        if r.cache.dir and Path(r.cache.dir).is_dir():
            from ..cache.towers import TowerFeatures

            ident = {k: v for k, v in tower.identity().items() if k != "name"}
            store = TowerFeatures(r.cache.dir, {**ident, "preprocess": tower.preprocess.to_dict()})
            table, bad = stored_image_table(rows, store, tower.preprocess, tower.encode, write=dist.is_main(), **opts)
            log.info("photo features of the tower %s kept in %s", tower.name, store.folder)
        else:
            table, bad = image_table(rows, tower.preprocess, tower.encode, **opts)
        tower.model.cpu()
        return table, bad

    def fit(self, data: Any = None) -> FitResult:
        """Train; the adapter is written to ``<output_dir>/adapter`` (``load_vlm`` reads it)."""
        r = self.recipe
        source, rows = image_caption_rows(r, data, "adapter training (the captions are the answers) needs")
        inputs = {**recipe_inputs(r), **run_inputs(source, rows)}
        if self.tower.folder is not None:
            inputs["the vision tower (vlm.tower)"] = str(self.tower.folder)
        check_output_dir(Path(r.train.output_dir), inputs, r.train.overwrite)
        pipe = build_pipeline(rows, r, None)
        model = self._model()
        # what the tower, the LM and a starting adapter are, not where they lie or what they are called
        vision = {k: v for k, v in model.vision.items() if k not in ("path", "name")}
        lm = {k: v for k, v in model.config(Path(r.train.output_dir))["lm"].items() if k not in ("lm", "name")}
        run = run_identity(r, vision=vision, lm=lm, data=pipe.fingerprint)
        if r.vlm.init_adapter:
            from ..teachers.base import file_hash
            from .adapter import WEIGHTS, adapter_folder

            run["init_adapter"] = file_hash(adapter_folder(r.vlm.init_adapter) / WEIGHTS)
        loop = TrainLoop(r, None, pipe.make_loader, run=run, rows=pipe.train, inputs=inputs)
        loop.claim()
        loop.skips = pipe.skip_log(Path(r.train.output_dir) / "skipped.jsonl", write=dist.is_main(),
                                   resume=loop.resume_from is not None)
        table, bad = self.features(pipe.train, pipe.fingerprint)
        if len(bad) == len(pipe.train):
            first = next(iter(bad))
            raise DataError(f"{pipe.train.source or 'the data'}: no photo of its {len(bad)} rows could be read (row "
                            f"{first + 1}: {pipe.train.images[first]}: {bad[first]}); `distill data check` lists them")
        pipe.with_dataset(TableRows(pipe.train, bad), make_collate({}))
        loop.modules, loop.make_loader = AdapterStep(model, table, r.vlm.feature_noise), pipe.make_loader
        history, steps = loop.run()
        out = Path(r.train.output_dir) / "adapter"
        if loop.is_main:
            model.provenance = provenance(run, pipe.train, 0, steps, source)
            model.cpu().save(out, card=adapter_card(model, steps, len(pipe.train)))
        return FitResult(out.parent, history, model, out, steps,
                         {"samples_per_s": loop.samples_per_s, "skipped": loop.skips.count, "timing": loop.timing})


def adapter_card(model: VisionLanguageModel, steps: int, rows: int) -> str:
    """The adapter folder's README: what it connects, how it was trained, how to use it, and its limits."""
    v, lm = model.vision, model.config(Path("."))["lm"]
    p = model.projector.spec()
    return "\n".join([
        f"# Adapter: {v.get('name')} -> {lm.get('name')}", "",
        f"A {p['features']} projector ({p['width']} -> {p['lm_width']}; "
        + (f"{p['prefix_tokens']} prefix tokens" if p["features"] == "pooled" else f"merge {p['merge']}")
        + f") trained {steps} steps on {rows} image-caption rows with clip-distill; the language model "
        f"{lm.get('name')} ({lm.get('arch')}, {lm.get('weights')}) stayed frozen"
        + (f" (LoRA rank {model.lora['rank']} trained)" if model.lora else "") + ".", "",
        f"- vision tower: {v.get('name')} ({v.get('features')}, width {v.get('width')}, space {v.get('space')})",
        f"- prompt: {model.prompt_text!r}", "",
        "Use: `distill caption THIS_FOLDER PHOTOS...` or `caption_images(load_vlm(THIS_FOLDER), photos)`. A pooled adapter "
        "also reads any student distilled from the same teacher (its embeddings are in the teacher's space); "
        "another tower or LM is refused.", "",
        "Limits: it captions what its training captions describe, in their language and style; it is not a "
        "general assistant and it can describe things that are not in the photo.", ""])


__all__ = ["AdapterTrainer", "AdapterStep", "adapter_card"]
