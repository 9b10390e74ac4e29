"""Students: ``create_student(name, embed_dim=...)`` builds one by name; ``Student.save`` / ``read_student``
keep it in a folder (``distill.load_student`` also reads the export layouts).

Names (``distill.names``): the registered towers (``list_students()``), ``"timm:<any timm model>"``,
``"openclip:<arch>"`` (an open_clip image tower), ``"hf:<any HF text encoder id or folder>"``, a saved
student folder, or two tower names joined by ``+`` (``"vit_tiny+bert_small"``) for a two-tower student.
"""
from __future__ import annotations

from typing import Any

from .._compat import forward
from .._imports import require
from ..errors import MissingFileError, RecipeError, UnknownNameError
from ..names import parse_model_name
from . import efficientnet as _efficientnet  # noqa: F401  (registers efficientnet_lite0/1/2)
from . import image as _image
from . import text as _text
from .base import ImageTower, OpenClipTextTower, Student, TextTower
from .registry import STUDENTS, register_student
from .saved import read_student


def list_students(pattern: str = "*") -> list[str]:
    return STUDENTS.list(pattern)


def create_tower(name: str, embed_dim: int, **kwargs: Any):
    """One tower by name: registered, ``timm:<name>``, ``openclip:<arch>`` or ``hf:<id|dir>``. An unknown name
    or an option the tower does not take stops with the close matches or the option named."""
    parsed = parse_model_name(name, STUDENTS)
    try:
        if parsed.kind == "timm":
            _check_timm_name(parsed.value)
            return _image.timm_tower(parsed.value, embed_dim, **kwargs)
        if parsed.kind == "openclip":
            from .open_clip import openclip_tower

            return openclip_tower(parsed.value, embed_dim, **kwargs)
        if parsed.kind == "hf":
            return _text.hf_text_tower(parsed.value, embed_dim, **kwargs)
        if parsed.kind != "registered":
            STUDENTS.get(name)  # raises UnknownNameError with close matches
        return STUDENTS.create(name, embed_dim=embed_dim, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e) and "got multiple values" not in str(e):
            raise
        raise _option_error(name, kwargs, e) from None


def _option_error(name: str, kwargs: dict[str, Any], e: TypeError) -> RecipeError:
    """The option a tower does not take, named with the ones it does."""
    import inspect
    import re

    bad = re.search(r"argument '(\w+)'", str(e))
    if bad and bad.group(1) in (kwargs.get("model_kwargs") or {}):
        return RecipeError(f"student.kwargs.model_kwargs: the {name} model takes no option {bad.group(1)!r}")
    fn = STUDENTS.get(name).fn if name in STUDENTS else None
    if fn is not None and list(inspect.signature(fn).parameters) == ["embed_dim", "kwargs"]:
        fn = _image.create_image_tower  # the registered image students pass their options on to it
    skip = ("embed_dim", "kwargs", "arch", "timm_name")
    takes = ", ".join(p for p in inspect.signature(fn).parameters if p not in skip) if fn else ""
    hint = f"; {name} takes {takes}" if takes else ""
    return RecipeError(f"student.kwargs: {str(e).split(') ', 1)[-1]}{hint}")


def _check_timm_name(model: str) -> None:
    if model.startswith(("hf-hub:", "local-dir:")):
        return
    timm = require("timm", "image students")
    if not timm.is_model(model):
        import difflib

        close = difflib.get_close_matches(model, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise UnknownNameError(f"unknown timm model {model!r}.{hint} (timm.list_models() lists them)")


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
            ``openclip:<arch>`` (an open_clip image tower), ``hf:<id|dir>``, ``"<image>+<text>"`` or a saved
            student folder (``Student.save``; exports load with ``distill.load_student``).
        embed_dim: the teacher's embedding dimension.
        image_kwargs / text_kwargs: per-tower options for a two-tower name.
        **kwargs: options of a single tower (``pretrained``, ``image_size``, ``model_kwargs``, ...).

    Example:
        >>> s = create_student("vit_tiny", embed_dim=512, image_size=64)
    """
    parsed = parse_model_name(name, STUDENTS)
    if parsed.kind == "folder":
        return read_student(parsed.value)
    if parsed.kind == "missing":
        raise MissingFileError(f"{name}: no such folder (a student is a registered name, timm:<name>, "
                               "openclip:<arch>, hf:<id|folder> or a saved student folder)")
    parts = name.split("+")
    if len(parts) > 2:
        raise RecipeError(f"student.name: {name!r}: at most one image and one text tower")
    towers = []
    for part in parts:
        opts = dict(kwargs) if len(parts) == 1 else {}
        is_text = part.startswith("hf:") or (part in STUDENTS and STUDENTS.meta(part).get("modality") == "text")
        opts.update((text_kwargs if is_text else image_kwargs) or {})
        towers.append(create_tower(part, embed_dim, **opts))
    image = next((t for t in towers if isinstance(t, ImageTower)), None)
    text = next((t for t in towers if isinstance(t, (TextTower, OpenClipTextTower))), None)
    if len(parts) == 2 and (image is None or text is None):
        raise RecipeError(f"student.name: {name!r}: a two-tower student needs one image and one text tower")
    return Student(image, text, embed_dim)


__getattr__ = forward(__name__, "distill.interop", {"load_student": "load_student"})  # moved: one more release


__all__ = [
    "STUDENTS", "register_student", "create_student", "create_tower", "list_students", "read_student",
    "Student", "ImageTower", "TextTower", "OpenClipTextTower",
]
