"""Students saved by ``Student.save``: ``model.safetensors`` + ``config.json`` (+ ``text/``), read back
without the trainer or any hub."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import DistillError, FileFormatError, MissingFileError, first_line
from ..io import load_tensors, read_format_json, resolved_teacher
from ..transforms import PreprocessCfg
from .base import FORMAT, Student
from .image import build_image_tower
from .text import build_text_tower_from_folder


def read_student(path: str | Path, device: str | torch.device = "cpu") -> Student:
    """Rebuild a student saved by ``Student.save`` from its folder (no trainer, no hub). Other layouts
    (open_clip, sentence-transformers, timm exports) are read by ``distill.load_student``."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: no such folder" if not path.exists() else f"{path}: not a folder")
    cfg = read_format_json(path / "config.json", FORMAT, "not a saved model folder (a student, teacher or export)")
    embed_dim = int(cfg["embed_dim"])
    image = text = None
    if "image" in cfg:
        spec = dict(cfg["image"])
        pre = PreprocessCfg.from_dict(spec.pop("preprocess"))
        image = build_image_tower(spec, embed_dim, pre, pretrained=False)
    if "text" in cfg:
        if not (path / "text").is_dir():
            raise MissingFileError(f"{path / 'text'}: no such folder; the student's text tower (its config and "
                                   "tokenizer) is missing: copy the whole saved folder")
        try:
            text = build_text_tower_from_folder(path / "text", embed_dim, cfg["text"])  # HF or open_clip
        except (OSError, ValueError, KeyError) as e:  # transformers on a damaged config or tokenizer
            if isinstance(e, DistillError):
                raise
            raise FileFormatError(f"{path / 'text'}: the text tower's config or tokenizer cannot be read "
                                  f"({type(e).__name__}: {first_line(e, 150)}); save the model again") from None
    student = Student(image, text, embed_dim)
    state = load_tensors(path / "model.safetensors")
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        student.load_state_dict(state, strict=True)
    except RuntimeError as e:  # the weights are of another model than config.json describes
        raise FileFormatError(f"{path / 'model.safetensors'}: does not match {path / 'config.json'} "
                              f"({first_line(e, 200)}); save the model again") from None
    student.teacher_identity = resolved_teacher(cfg.get("teacher"), path)
    student.provenance = cfg.get("trained")
    return student.to(device).eval()
