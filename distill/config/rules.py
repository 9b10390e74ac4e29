"""What a recipe's values may be (``RULES``, by dotted path) and the checks across keys (``validate``). Names
are checked against the registries passed in (the loss registry by default: light, no torch)."""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any

from ..errors import RecipeError
from .schema import (CACHE_DTYPES, IMAGE_MODES, LOCKS, LORA_TOWERS, OPTIMIZERS, PRECISIONS, TEXT_MODES, VLM_FEATURES,
                     Recipe)


def _at_least(low: float) -> Any:
    return lambda v: (math.isfinite(v) and v >= low, f"must be a finite number >= {low}" if isinstance(low, float)
                      else f"must be >= {low}")


def _above(low: float) -> Any:
    return lambda v: (math.isfinite(v) and v > low, f"must be > {low}")


def _one_of(*choices: str) -> Any:
    return lambda v: (v in choices, f"must be one of {', '.join(choices)}")


def _fraction(v: float) -> tuple[bool, str]:
    return 0.0 <= v <= 1.0, "must be between 0 and 1"


def _crop_scale(v: tuple[float, float]) -> tuple[bool, str]:
    return 0.0 < v[0] <= v[1] <= 1.0, "must be two area fractions 0 < low <= high <= 1"


def _betas(v: tuple[float, float]) -> tuple[bool, str]:
    return all(0.0 <= b < 1.0 for b in v), "must be two numbers in [0, 1)"


def _image_size(v: int | None) -> tuple[bool, str]:
    return v is None or v >= 8, "must be at least 8 (pixels), or null for the student's default"


def _loss_weights(v: dict[str, float], losses: Any) -> tuple[bool, str]:
    unknown = [k for k in v if k not in losses]
    if unknown:
        close = difflib.get_close_matches(unknown[0], losses.list(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return False, f"unknown loss {unknown[0]!r}{hint}; losses are {', '.join(losses.list())}"
    if any(not math.isfinite(w) or w < 0 for w in v.values()):
        return False, "weights must be finite numbers >= 0"
    return any(w > 0 for w in v.values()), "at least one weight must be > 0"


RULES: dict[str, Any] = {
    "data.image_size": _image_size,
    "data.crop_scale": _crop_scale,
    "data.num_workers": _at_least(0),
    "data.text_target": _one_of("caption", "image"),
    "cache.views": _at_least(1),
    "cache.dtype": _one_of(*CACHE_DTYPES),
    "optim.optimizer": _one_of(*OPTIMIZERS),
    "optim.lr": _above(0),
    "optim.weight_decay": _at_least(0.0),
    "optim.betas": _betas,
    "optim.warmup_steps": _at_least(0),
    "optim.min_lr_ratio": _fraction,
    "optim.grad_clip": _at_least(0.0),
    "train.seed": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.max_steps": _at_least(1),
    "train.grad_accum": _at_least(1),
    "train.precision": _one_of(*PRECISIONS),
    "train.checkpoint_every": _at_least(0),
    "train.keep_checkpoints": _at_least(0),
    "train.log_every": _at_least(1),
    "train.health_every": _at_least(0),
    "train.health_rows": _at_least(0),
    "train.dist_timeout": _at_least(1),
    "tune.lock": _one_of(*LOCKS),
    "tune.init_temperature": _above(0),
    "tune.embed_dim": _at_least(1),
    "tune.queue": _at_least(0),
    "tune.unfreeze_last": _at_least(0),
    "tune.lora_rank": _at_least(1),
    "tune.lora_alpha": _above(0),
    "tune.lora_dropout": lambda v: (0.0 <= v < 1.0, "must be in [0, 1)"),
    "tune.lora_towers": _one_of(*LORA_TOWERS),
    "vlm.features": _one_of(*VLM_FEATURES),
    "vlm.prefix_tokens": _at_least(1),
    "vlm.projector_hidden": _at_least(1),
    "vlm.merge": _at_least(1),
    "vlm.max_answer_tokens": _at_least(1),
    "vlm.lm_lora": _at_least(0),
    "vlm.feature_noise": _at_least(0.0),
    "vlm.lm_lora_alpha": _above(0),
}


def validate(recipe: Recipe, losses: Any = None) -> Recipe:
    """Check every value against ``RULES`` and the loss names against ``losses`` (default: ``distill.losses``'s
    registry), and the options across keys; raises RecipeError naming the key."""
    if losses is None:
        from ..losses import LOSSES as losses  # the names only: no torch
    rules = {**RULES, "loss.weights": lambda v: _loss_weights(v, losses)}
    for path, rule in rules.items():
        section, key = path.split(".")
        value = getattr(getattr(recipe, section), key)
        ok, why = rule(value)
        if not ok:
            raise RecipeError(f"{path}: {value!r} {why}" if why.startswith("must") else f"{path}: {why}")
    if recipe.train.resume and recipe.train.overwrite:
        raise RecipeError("train.overwrite: true deletes the checkpoints that train.resume: true continues from; "
                          "set one of them")
    recipe = _check_schedule(recipe)
    extra = sorted(set(recipe.loss.kwargs) - set(recipe.loss.weights))
    if extra:
        raise RecipeError(f"loss.kwargs.{extra[0]}: options for a loss that has no weight in loss.weights")
    for name, opts in recipe.loss.kwargs.items():
        if not isinstance(opts, dict):
            raise RecipeError(f"loss.kwargs.{name}: expected a mapping of options, got {opts!r}")
    return recipe


def _check_schedule(recipe: Recipe) -> Recipe:
    """Each stage's modes and amounts; ``train.max_steps`` becomes the sum of the stages' steps (a last
    stage without steps runs to ``train.max_steps``)."""
    stages = recipe.train.schedule
    for i, st in enumerate(stages):
        at = f"train.schedule[{i}]"
        if st.steps < 0 or (st.steps == 0 and i < len(stages) - 1):
            raise RecipeError(f"{at}.steps: {st.steps} must be >= 1 (only the last stage may leave it out)")
        img, txt = st.image_tokens, st.text_tokens
        for tower, cfg in (("image_tokens", img), ("text_tokens", txt)):
            given = [k for k in ("keep", "size") if getattr(cfg, k)]
            if given and not cfg.mode:  # without a mode the stage would feed every token
                modes = IMAGE_MODES if tower == "image_tokens" else TEXT_MODES
                raise RecipeError(f"{at}.{tower}.mode: {given[0]} is set but no mode says how to reduce the tokens; "
                                  f"name one of {', '.join(modes)}")
        if img.mode and img.mode not in IMAGE_MODES:
            raise RecipeError(f"{at}.image_tokens.mode: {img.mode!r} must be one of {', '.join(IMAGE_MODES)}")
        if img.size and img.mode != "resize" and img.mode:
            raise RecipeError(f"{at}.image_tokens.size: {img.size} is the side of a resize stage; {img.mode} keeps "
                              "a fraction of the patches (keep)")
        if img.mode == "resize" and img.size and img.keep:
            raise RecipeError(f"{at}.image_tokens: resize takes size (pixels) or keep (a fraction of the tokens), "
                              "not both")
        if img.mode == "resize" and not (img.size >= 8 or 0 < img.keep <= 1):
            raise RecipeError(f"{at}.image_tokens: resize needs size (pixels, >= 8) or keep (a fraction of the "
                              "tokens in (0, 1])")
        if img.mode in ("random", "block") and not 0 < img.keep <= 1:
            raise RecipeError(f"{at}.image_tokens.keep: {img.keep!r} must be a fraction of the patches in (0, 1]")
        if img.mode == "grid" and img.keep not in (0.0, 0.25):
            raise RecipeError(f"{at}.image_tokens.keep: grid keeps one patch of every 2x2 window (0.25), not {img.keep}")
        if txt.mode and txt.mode not in TEXT_MODES:
            raise RecipeError(f"{at}.text_tokens.mode: {txt.mode!r} must be one of {', '.join(TEXT_MODES)}")
        if txt.mode and not (txt.keep >= 1 and float(txt.keep).is_integer()):
            raise RecipeError(f"{at}.text_tokens.keep: {txt.keep!r} must be a whole number of tokens >= 1")
    if not stages:
        return recipe
    total = sum(st.steps for st in stages)
    if stages[-1].steps == 0:
        if total >= recipe.train.max_steps:
            raise RecipeError(f"train.schedule: the stages before the last take {total} steps, train.max_steps is "
                              f"{recipe.train.max_steps}: nothing is left for the last stage")
        return recipe
    return dataclasses.replace(recipe, train=dataclasses.replace(recipe.train, max_steps=total))


