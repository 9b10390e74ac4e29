"""open_clip towers: the model an ``openclip:<arch>`` name builds (teachers use it whole), its image tower
as a student trunk, and its text tower kept whole (a student paired with an open_clip teacher)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .._imports import require
from ..errors import ExportError, RecipeError
from ..transforms import PreprocessCfg
from .base import ImageTower, OpenClipTextTower, keep_space


def _add_model_config(open_clip: Any, arch: str, model_cfg: dict[str, Any]) -> None:
    """Register ``model_cfg`` under ``arch`` through open_clip's public ``add_model_config`` (a JSON file)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.json"
        path.write_text(json.dumps(model_cfg), encoding="utf-8")
        open_clip.add_model_config(path)


def create_open_clip_model(arch: str, pretrained: str | None = None, model_cfg: dict[str, Any] | None = None,
                           **kwargs: Any):
    """(open_clip model, its PreprocessCfg). ``model_cfg`` registers a custom architecture config
    under ``arch`` first (tests use tiny ones)."""
    open_clip = require("open_clip", "open_clip models")
    if model_cfg is not None:
        _add_model_config(open_clip, arch, model_cfg)
    try:
        model = open_clip.create_model(arch, pretrained=pretrained, **kwargs)
    except Exception as e:  # noqa: BLE001 - open_clip reports unreadable weights with many types
        raise _weights_error(arch, pretrained, e) from None
    pc = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = pc.get("size", model.visual.image_size)
    size = size[-1] if isinstance(size, (tuple, list)) else size
    pre = PreprocessCfg(
        image_size=int(size),
        mean=tuple(pc.get("mean", PreprocessCfg.mean)),
        std=tuple(pc.get("std", PreprocessCfg.std)),
        interpolation=pc.get("interpolation", "bicubic"),
        resize_mode="squash" if pc.get("resize_mode") == "squash" else "shortest",
    )
    return model, pre


def _weights_error(arch: str, pretrained: str | None, e: Exception) -> Exception:
    """One line for open_clip weights that cannot be had: a local file that is unsafe or of another model,
    a tag that is unknown or cannot be downloaded here. Anything else is re-raised as it is."""
    from ..errors import FileFormatError, ModelError, first_line

    if pretrained and os.path.isfile(pretrained):
        if type(e).__name__ == "UnpicklingError":
            why = "weights_only=True: it holds Python objects besides tensors, never unpickled: that could run code"
        else:
            why = f"{type(e).__name__}: {first_line(e, 160)}"
        return FileFormatError(f"{pretrained}: not weights of open_clip's {arch} that can be read safely ({why}); "
                               "save a plain state dict, or a safetensors file")
    if pretrained and isinstance(e, (OSError, RuntimeError, ValueError)):
        return ModelError(f"teacher.pretrained: {pretrained!r} weights of {arch} cannot be had here "
                          f"({first_line(e, 160)}); give a local weights file (teacher.pretrained=PATH)")
    return e


def openclip_image_tower(spec: dict[str, Any], embed_dim: int, preprocess: PreprocessCfg | None,
                         pretrained: bool | str) -> ImageTower:
    """The image tower of the open_clip model ``spec`` names ({arch, openclip, model_cfg}) + a projection head."""
    model, pre = create_open_clip_model(spec["openclip"], pretrained if isinstance(pretrained, str) else None,
                                        spec.get("model_cfg"))
    trunk = model.visual  # the text tower and logit scale are dropped
    trunk.num_features = trunk.output_dim
    tower = ImageTower(trunk, embed_dim, preprocess or pre, spec)
    if pretrained:
        keep_space(tower.proj)
    return tower


def openclip_tower(arch: str, embed_dim: int = 512, pretrained: str | None = None,
                   model_cfg: dict[str, Any] | None = None, image_size: int | None = None) -> ImageTower:
    """The image tower of an open_clip model (``create_student("openclip:ViT-B-32", pretrained=tag)``),
    for composite models and teacher tuning; ``pretrained``: a tag or a local weights file."""
    if image_size is not None:
        raise RecipeError("student.kwargs.image_size: openclip towers keep their architecture's image size; drop it")
    spec = {"arch": f"openclip:{arch}", "openclip": arch, "model_cfg": model_cfg}
    return openclip_image_tower(spec, embed_dim, None, pretrained or False)


def openclip_text_tower(spec: dict[str, Any], tokenizer: Any) -> OpenClipTextTower:
    """An open_clip text tower (random weights) from ``spec["model_cfg"]`` = {embed_dim, quick_gelu, text_cfg}."""
    require("open_clip", "open_clip text towers")
    from open_clip.model import (
        _build_text_tower,  # open_clip's own builder: its CLIP and CustomTextCLIP call it
    )

    cfg = spec["model_cfg"]
    if cfg["text_cfg"].get("hf_model_name"):
        raise ExportError(f"{spec['arch']}: open_clip text towers built on a Hugging Face encoder "
                          f"({cfg['text_cfg']['hf_model_name']}) are not supported; pair a native open_clip text tower")
    encoder = _build_text_tower(int(cfg["embed_dim"]), dict(cfg["text_cfg"]), bool(cfg.get("quick_gelu", False)))
    return OpenClipTextTower(encoder, tokenizer, int(cfg["embed_dim"]), dict(spec))


def open_clip_tokenizer(folder: str | os.PathLike):
    """The tokenizer an ``open_clip_config.json`` in ``folder`` names (CLIP BPE, or HF files beside it)."""
    open_clip = require("open_clip", "open_clip text towers")
    return open_clip.get_tokenizer(f"local-dir:{Path(folder)}")
