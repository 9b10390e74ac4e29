"""Teachers saved by this library (a tuned or demo two-tower model): ``load_teacher("path/to/folder")``."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..interop import load_student
from ..students.base import Student
from .base import Teacher, file_hash


class FolderTeacher(Teacher):
    """Wraps a saved two-tower model (``Student.save`` layout) as a frozen teacher.

    Its identity is the architecture and the hash of its weights; the folder's ``path`` is recorded
    (to load it again) but never compared: a copied or moved teacher is the same teacher."""

    backend = "folder"

    def __init__(self, model: Student, name: str, path: str = ""):
        pre = model.preprocess
        ctx = model.text.context_length if model.text is not None else 0
        super().__init__(name, model.embed_dim, pre, ctx)
        self.model = model
        self.path = path
        self.freeze()

    @property
    def identity(self) -> dict:
        return {**super().identity, "path": self.path}

    @property
    def has_text(self) -> bool:
        return self.model.text is not None

    def image_module(self):
        return self.model.image

    def tokenize(self, texts: Sequence[str]):
        return self.model.tokenize(texts)

    def _image(self, pixels):
        return self.model.image_features(pixels)

    def _text(self, tokens):
        return self.model.text_features(tokens)


WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors")  # a student folder, or an open_clip export


def weights_file(path: str | Path) -> Path | None:
    """The weights file of a saved model folder (None when it has none of ``WEIGHT_FILES``)."""
    return next((Path(path) / f for f in WEIGHT_FILES if (Path(path) / f).is_file()), None)


def load_folder(path: str | Path) -> FolderTeacher:
    path = Path(path)
    model = load_student(path)
    arch = "+".join(t.spec.get("arch", "?") for t in (model.image, model.text) if t is not None)
    teacher = FolderTeacher(model, arch, str(path.resolve()))
    weights = weights_file(path)
    teacher.weights_id = file_hash(weights) if weights is not None else "unknown"
    return teacher
