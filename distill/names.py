"""One grammar for model names, as open_clip's ``parse_model_name``: teachers and students read names here.

    openclip:<arch>        an open_clip architecture (weights: a tag or a file, given apart)
    hf:<id or folder>      a Hugging Face model (a CLIP/SigLIP teacher, a text encoder student)
    text:<id or folder>    a text-only teacher (sentence-transformers folders honoured)
    timm:<name>            any timm model as an image student
    <registered name>      a preset teacher or a registered student (``list_teachers()``, ``list_students()``)
    <folder>               a model saved by this library (or an export it reads)

A registered name wins over a folder of the same name in the working directory; a name that looks like a
path (it holds a separator, or starts with ``.`` or ``~``) and does not exist is a missing folder.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Container

PREFIXES = ("openclip", "hf", "text", "timm")


@dataclass(frozen=True)
class ModelName:
    kind: str  # "openclip" | "hf" | "text" | "timm" | "registered" | "folder" | "missing" | "unknown"
    value: str  # what follows the prefix; the name or the folder otherwise

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" if self.kind in PREFIXES else self.value


def looks_like_path(name: str) -> bool:
    return os.sep in name or (os.altsep or "\0") in name or name.startswith((".", "~"))


def parse_model_name(name: str, registered: Container[str] = ()) -> ModelName:
    """What ``name`` names: a backend prefix, a registered name (of ``registered``), a folder, a folder that
    does not exist (``missing``), or nothing known (``unknown``: the caller lists the close matches)."""
    prefix, sep, rest = name.partition(":")
    if sep and prefix in PREFIXES:
        return ModelName(prefix, rest)
    if name in registered:
        return ModelName("registered", name)
    if os.path.isdir(os.path.expanduser(name)):
        return ModelName("folder", os.path.expanduser(name))
    return ModelName("missing" if looks_like_path(name) else "unknown", name)


__all__ = ["ModelName", "parse_model_name", "looks_like_path", "PREFIXES"]
