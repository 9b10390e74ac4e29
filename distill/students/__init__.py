"""Student registry: ``create_student(name, embed_dim=...)``, ``load_student(folder)``.

Names: the registered towers (``list_students()``), ``"timm:<any timm model>"``,
``"hf:<any HF text encoder id or folder>"``, a saved student folder, or two tower
names joined by ``+`` (``"vit_tiny+bert_small"``) for a two-tower student.
"""
from __future__ import annotations

import os
from typing import Any

from ..errors import RecipeError
from ..registry import Registry

STUDENTS = Registry("student")
register_student = STUDENTS.register

from . import image as _image  # noqa: E402,F401  (registers the built-ins)
from . import text as _text
from .base import ImageTower, OpenClipTextTower, Student, TextTower, load_student  # noqa: E402


def list_students(pattern: str = "*") -> list[str]:
    return STUDENTS.list(pattern)


def create_tower(name: str, embed_dim: int, **kwargs: Any):
    """One tower by name: registered, ``timm:<name>`` or ``hf:<id|dir>``."""
    if name.startswith("timm:"):
        return _image.timm_tower(name[5:], embed_dim, **kwargs)
    if name.startswith("openclip:"):
        return _image.openclip_tower(name[9:], embed_dim, **kwargs)
    if name.startswith("hf:"):
        return _text.hf_text_tower(name[3:], embed_dim, **kwargs)
    return STUDENTS.create(name, embed_dim=embed_dim, **kwargs)


def create_student(
    name: str,
    embed_dim: int = 512,
    image_kwargs: dict[str, Any] | None = None,
    text_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Student:
    """Create a student by name with a projection head to ``embed_dim``.

    Args:
        name: ``vit_tiny``, ``resnet18``, ``mobilevit_s``, ``bert_small``, ``timm:<name>``,
            ``openclip:<arch>`` (an open_clip image tower), ``hf:<id|dir>``, ``"<image>+<text>"`` or a saved student folder.
        embed_dim: the teacher's embedding dimension.
        image_kwargs / text_kwargs: per-tower options for a two-tower name.
        **kwargs: options of a single tower (``pretrained``, ``image_size``, ``model_kwargs``, ...).

    Example:
        >>> s = create_student("vit_tiny", embed_dim=512, image_size=64)
    """
    if os.path.isdir(name):
        return load_student(name)
    parts = name.split("+")
    if len(parts) > 2:
        raise RecipeError(f"student.name: {name!r}: at most one image and one text tower")
    towers = []
    for part in parts:
        opts = dict(kwargs) if len(parts) == 1 else {}
        is_text = part.startswith("hf:") or (part in STUDENTS and STUDENTS.meta(part).get("modality") == "text")
        tower_kwargs = text_kwargs if is_text else image_kwargs
        opts.update(tower_kwargs or {})
        towers.append(create_tower(part, embed_dim, **opts))
    image = next((t for t in towers if isinstance(t, ImageTower)), None)
    text = next((t for t in towers if isinstance(t, TextTower)), None)
    if len(parts) == 2 and (image is None or text is None):
        raise RecipeError(f"student.name: {name!r}: a two-tower student needs one image and one text tower")
    return Student(image, text, embed_dim)


__all__ = [
    "STUDENTS", "register_student", "create_student", "create_tower", "list_students",
    "load_student", "Student", "ImageTower", "TextTower", "OpenClipTextTower",
]
