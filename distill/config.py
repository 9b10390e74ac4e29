"""Typed recipe configuration.

A recipe YAML lists only what differs from the defaults below. Loading is
``defaults <- YAML <- command-line overrides`` (``train.lr=1e-4``); unknown keys
and wrong types fail before any model is built, naming the key's dotted path.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from .errors import RecipeError

DEFAULT_TEACHER = "openclip_vit_b32"  # what an online run uses when the recipe names no teacher


@dataclass
class TeacherCfg:
    # registered name, "openclip:<arch>", "hf:<id|dir>", "text:<id|dir>" or a folder. Empty: the teacher
    # recorded in the cache (cache.dir), else DEFAULT_TEACHER; a teacher that is not named is never
    # loaded to fill rows a cache lacks.
    name: str = ""
    pretrained: Optional[str] = None  # open_clip tag or local weights file (open_clip backend)
    kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to the teacher loader


@dataclass
class StudentCfg:
    name: str = "vit_tiny"  # registered name, "timm:<name>", "hf:<id|dir>", or "image+text" (e.g. vit_tiny+bert_small)
    kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to create_student (pretrained, model_kwargs, ...)


@dataclass
class DataCfg:
    train: str = ""  # csv/tsv/json/jsonl of image,caption, or a folder
    image_size: Optional[int] = None  # student input size; None = the student's default
    augment: bool = True  # random-resized crops, the same crop replayed for teacher and student
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area range of the random crop (also of cache views)
    flip: bool = False  # random horizontal flips too (off: captions say "left" and "right"), as open_clip
    image_column: Optional[str] = None  # column/key holding the image path (auto-detected when None)
    caption_column: Optional[str] = None  # column/key holding the caption (auto-detected when None)
    num_workers: int = 2  # DataLoader workers decoding images
    packed: Optional[str] = None  # a store from `distill data pack`: read pre-resized bytes, not JPEGs
    # parallel sentences (a csv with one column per language): the teacher reads `parallel_source`, the
    # student learns each of `parallel_targets` onto it, and the source too. Empty: every other column
    # whose header is a language code (de, zh-cn) and whose values are sentences (never ids, paths, scores)
    parallel_source: Optional[str] = None
    parallel_targets: list[str] = field(default_factory=list)
    parallel_keep_source: bool = True  # also train source -> source, so the student keeps that language
    # batches of captions of similar token length (a text student pads far less; transformers' option)
    group_by_length: bool = False
    text_target: str = "caption"  # what a caption is learnt onto: caption (the teacher's text embedding of it)
    # or image (the teacher's embedding of its image: captions in a language the teacher cannot read)


@dataclass
class CacheCfg:
    dir: Optional[str] = None  # teacher embedding cache (distill cache build); None = run the teacher online
    allow_stale: bool = False  # use a cache built with another teacher identity / preprocessing anyway
    views: int = 1  # views per image when the cache is built (or extended) by the run itself
    dtype: str = "fp16"  # fp16 | fp32 storage of cache rows built by the run itself


@dataclass
class LossCfg:
    weights: dict[str, float] = field(default_factory=lambda: {"cosine": 1.0, "contrastive": 1.0})
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-loss options, e.g. {affinity: {tau: 0.1}}


@dataclass
class OptimCfg:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA only: 75% less optimiser memory)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TokensCfg:
    """What a stage feeds the student of one tower (``distill.tokens``); an empty mode = every token."""
    mode: str = ""  # image: resize | random | grid | block; text: truncate | random | block | syntax
    keep: float = 0.0  # image: fraction of the patch tokens (grid: 0.25); text: tokens kept besides special ones
    size: int = 0  # image resize: the side in pixels (instead of keep)
    tagger: str = "nltk"  # text syntax: nltk | textblob | spacy:<pipeline>


@dataclass
class StageCfg:
    steps: int = 0  # optimiser steps of this stage; the last stage may leave it 0 to run to train.max_steps
    image_tokens: TokensCfg = field(default_factory=TokensCfg)
    text_tokens: TokensCfg = field(default_factory=TokensCfg)


@dataclass
class TrainCfg:
    output_dir: str = "runs/distill"
    batch_size: int = 64  # per device, per micro-step
    max_steps: int = 1000  # optimiser steps
    grad_accum: int = 1  # micro-steps per optimiser step
    precision: str = "auto"  # auto | no | fp16 | bf16 (auto = bf16 on a GPU that has it, else fp32)
    seed: int = 0
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10
    resume: bool = False  # continue from the last checkpoint in output_dir (of the same run)
    overwrite: bool = False  # start again in an output_dir that holds a run: its checkpoints and logs are deleted
    progress: bool = True  # tqdm progress bar
    health_every: int = 200  # steps between health checks on a held-out slice; 0 = off
    health_rows: int = 256  # images held out for them (at most a tenth of the data; off below 32)
    cpu: bool = False  # force CPU even when a GPU is present
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    channels_last: bool = False  # NHWC memory format for CNN students (faster convs with autocast)
    compile: bool = False  # torch.compile the student (first steps are slow while it compiles)
    dist_timeout: int = 1800  # seconds a process waits for the others (several processes) before the run stops
    # stages with fewer tokens, e.g. [{steps: 4000, image_tokens: {mode: random, keep: 0.5}}, {steps: 500}]
    # (CLIPA); one learning-rate schedule over all of them; max_steps becomes the sum of their steps
    schedule: list[StageCfg] = field(default_factory=list)


@dataclass
class TuneCfg:
    lock: str = "none"  # contrastive tuning (distill tune): none | text (LiT) | image | both (heads only) | lora
    init_temperature: float = 0.07  # learnable softmax temperature of the CLIP loss
    embed_dim: int = 512  # shared space of the two towers' projection heads (when built from the recipe)
    queue: int = 0  # past embeddings of the locked tower kept as extra negatives (lock=text|image)
    unfreeze_last: int = 0  # the last N blocks of each locked trunk train too (lock=text|image|both)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_towers: str = "both"  # image | text | both: towers that get adapters (lock=lora)
    lora_targets: list[str] = field(default_factory=list)  # module names; empty = every Linear of the tower


@dataclass
class Recipe:
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    data: DataCfg = field(default_factory=DataCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    tune: TuneCfg = field(default_factory=TuneCfg)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


# Flat Distiller/Tuner options -> dotted recipe paths. Field names that are unique
# across the training sections map to themselves; a few aliases read better.
_ALIASES = {"loss_weights": "loss.weights", "loss_kwargs": "loss.kwargs", "data": "data.train",
            "cache": "cache.dir", "cache_views": "cache.views", "cache_dtype": "cache.dtype"}
_FLAT_SECTIONS = ("data", "cache", "loss", "optim", "train", "tune")


def flat_options() -> dict[str, str]:
    """Option name accepted by ``Distiller(**options)`` -> dotted recipe path."""
    seen: dict[str, list[str]] = {}
    for section in _FLAT_SECTIONS:
        for f in dataclasses.fields(_section_type(section)):
            seen.setdefault(f.name, []).append(f"{section}.{f.name}")
    out = {k: v[0] for k, v in seen.items() if len(v) == 1}
    out.update(_ALIASES)
    return out


def _section_type(section: str) -> type:
    return typing.get_type_hints(Recipe)[section]


def apply_options(recipe: Recipe, options: dict[str, Any]) -> Recipe:
    """Set flat options (``lr=1e-3``) or dotted ones (``{"optim.lr": 1e-3}``) on a recipe, type-checked."""
    table = flat_options()
    dotted = {}
    for key, value in options.items():
        if "." in key:
            dotted[key] = value
        elif key in table:
            dotted[table[key]] = value
        else:
            close = difflib.get_close_matches(key, list(table), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise RecipeError(f"{key}: unknown option{hint}")
    for key, value in dotted.items():
        recipe = set_dotted(recipe, key, value)
    return validate(recipe)


def set_dotted(recipe: Recipe, key: str, value: Any) -> Recipe:
    """``recipe`` with one dotted key set. A key that names a field replaces it; a key that goes into a
    mapping field (``loss.weights.mse``, ``student.kwargs.image_size``, ``loss.kwargs.contrastive.queue``)
    sets that entry and keeps the mapping's others."""
    parts = key.split(".")
    obj, depth = recipe, 0
    while depth < len(parts) and dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if parts[depth] not in names:
            break  # merge() names the unknown key with a suggestion
        obj = getattr(obj, parts[depth])
        depth += 1
    if depth < len(parts) and isinstance(obj, dict) and depth > 0:
        entry = copy.deepcopy(obj)
        node = entry
        for p in parts[depth:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise RecipeError(f"{key}: {'.'.join(parts[:parts.index(p) + 1])} is not a mapping")
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        parts, value = parts[:depth], entry
    nested: Any = value
    for p in reversed(parts):
        nested = {p: nested}
    return merge(recipe, nested)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["train.lr=1e-4", "loss.weights.mse=0.5"]`` -> ``{dotted key: value}`` (values parsed as YAML)."""
    dotted = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"{item}: override must look like section.key=value")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise RecipeError(f"{item}: override must look like section.key=value")
        try:
            dotted[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise RecipeError(f"{key.strip()}: {raw!r} is not a valid value (YAML)") from None
    return dotted


def read_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a file; a file that is not UTF-8 or not YAML fails naming its line."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file" if not path.exists() else f"{path}: not a file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RecipeError(f"{where}: not valid YAML ({problem})") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> Recipe:
    """Defaults <- YAML file <- ``section.key=value`` overrides; raises RecipeError with the key path."""
    recipe = Recipe()
    if path is not None:
        data = read_yaml(path)
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise RecipeError(f"{path}: a recipe must be a mapping of sections, not a {type(data).__name__}")
        try:
            recipe = validate(merge(recipe, data))
        except RecipeError as e:
            raise RecipeError(f"{e} (in {path})") from None
    if overrides:
        for key, value in parse_overrides(overrides).items():
            recipe = set_dotted(recipe, key, value)
        recipe = validate(recipe)
    return recipe


def merge(obj: Any, delta: dict[str, Any], path: str = "") -> Any:
    """Return a copy of dataclass ``obj`` with ``delta`` applied, checked against field types."""
    if not isinstance(delta, dict):
        raise RecipeError(f"{path or '<root>'}: expected a mapping, got {type(delta).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in delta.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            full = f"{path}.{close[0]}" if path and close else (close[0] if close else "")
            hint = f"; did you mean {full}?" if close else f"; valid keys: {', '.join(names)}"
            raise RecipeError(f"{where}: unknown key{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, where)
        else:
            if where in _BOOL_WORDS and isinstance(value, bool):  # YAML 1.1 reads `no` / `off` as false
                value = _BOOL_WORDS[where][value]
            changes[key] = _coerce(value, hints[key], where)
    return dataclasses.replace(obj, **changes)


_BOOL_WORDS = {"train.precision": {False: "no", True: "yes"}}  # `precision: no` means "no autocast"


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except RecipeError as e:
                errors.append(str(e))
        raise RecipeError(errors[0] if errors else f"{path}: expected {_type_name(tp)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args or (Any, Any)
        return {_coerce(k, kt, path): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{path}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise RecipeError(f"{path}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        seq = [_coerce(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else merge(tp(), value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecipeError(f"{path}: expected true/false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise RecipeError(f"{path}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise RecipeError(f"{path}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        hint = " (YAML reads no/off/yes/on as true/false: quote the word)" if isinstance(value, bool) else ""
        raise RecipeError(f"{path}: expected a string, got {value!r}{hint}")
    return value


# -- value checks: every numeric or enumerated field, by dotted path ------------------------------------
PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
CACHE_DTYPES = ("fp16", "fp32")
LOCKS = ("none", "text", "image", "both", "lora")
LORA_TOWERS = ("image", "text", "both")


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


def _loss_weights(v: dict[str, float]) -> tuple[bool, str]:
    from .losses import LOSSES  # torch: loaded only when a recipe is checked

    unknown = [k for k in v if k not in LOSSES]
    if unknown:
        close = difflib.get_close_matches(unknown[0], LOSSES.list(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return False, f"unknown loss {unknown[0]!r}{hint}; losses are {', '.join(LOSSES.list())}"
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
    "loss.weights": _loss_weights,
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
}


def validate(recipe: Recipe) -> Recipe:
    """Check every value against ``RULES`` (and options across keys); raises RecipeError naming the key."""
    for path, rule in RULES.items():
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
    from .tokens import IMAGE_MODES, TEXT_MODES

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


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from .io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
