"""Reading a recipe: ``defaults <- YAML <- command-line overrides`` (``train.lr=1e-4``), each value coerced to its
field's type; unknown keys and wrong types fail before any model is built, naming the key's dotted path."""
from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from ..errors import RecipeError
from .rules import validate
from .schema import Recipe


# Flat Distiller/Tuner options -> dotted recipe paths. Field names that are unique
# across the training sections map to themselves; a few aliases read better.
_ALIASES = {"loss_weights": "loss.weights", "loss_kwargs": "loss.kwargs", "data": "data.train",
            "cache": "cache.dir", "cache_views": "cache.views", "cache_dtype": "cache.dtype"}
_FLAT_SECTIONS = ("data", "cache", "loss", "optim", "train", "tune", "vlm")


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


def save_recipe(recipe: Recipe, path: str | Path) -> None:
    from ..io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(recipe.to_dict(), sort_keys=False))
