"""The frozen vision tower a language model looks through: any image tower ``load_student`` reads (a teacher
folder, a distilled student, a run), what its features are (the pooled embedding in its teacher's space, or its
patch tokens), and its identity: the weights it is, and the embedding space it lives in (its teacher's), so
that an adapter trained on a teacher's embeddings can be handed a student of that teacher."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError


class VisionTower:
    """A frozen image model and what an adapter reads from it.

    Args:
        model: a Student (or anything with ``encode_image``, ``preprocess``, ``weights_id``).
        folder: where it was loaded from (its weights file digest is the space a student of it records).
        features: ``pooled`` (the normalised embedding) or ``patches`` (the trunk's patch tokens, [N, C]).
        image_size: run it at another input size than it was saved with (a CNN takes any: cheaper eyes,
            in the same space; ``benchmarks/vlm.py --sizes`` measures what each size costs in captions).
    """

    def __init__(self, model: Any, folder: str | os.PathLike | None = None, features: str = "pooled",
                 image_size: int | None = None):
        if getattr(model, "image", None) is None and not hasattr(model, "image_module"):
            raise ModelError(f"vlm.tower: {folder or 'the model'} has no image tower")
        self.model = model.eval()
        self.folder = Path(folder) if folder else None
        self.features = features
        self.preprocess = model.preprocess if getattr(model, "preprocess", None) is not None else model.image.preprocess
        saved = self.preprocess.image_size
        if image_size is not None and image_size != saved:
            self.preprocess = dataclasses.replace(self.preprocess, image_size=int(image_size))
            try:
                self.encode(torch.zeros(1, 3, image_size, image_size, device=self.device))
            except Exception as e:  # noqa: BLE001 - a ViT with a fixed position table, a size too small
                raise ModelError(f"image_size: {self.name} cannot run at {image_size} px ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:150]}); leave it at {saved}") from None
        if features == "patches" and not hasattr(self._trunk(), "forward_features"):
            raise ModelError(f"vlm.features: patches needs a timm trunk (forward_features); {self.name} has none: "
                             "use vlm.features=pooled")

    @classmethod
    def load(cls, path: str | os.PathLike, features: str = "pooled", device: str = "cpu",
             image_size: int | None = None) -> "VisionTower":
        from ..interop import load_student
        from ..outputs import model_folder

        p = Path(os.path.expanduser(str(path)))
        if not p.exists():
            raise ModelError(f"vlm.tower: {p}: no such folder (a saved teacher or student, or a run)")
        folder = model_folder(p)
        return cls(load_student(folder, device=device), folder, features, image_size)

    @property
    def name(self) -> str:
        return self.folder.name if self.folder else type(self.model).__name__

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _trunk(self) -> nn.Module:
        image = getattr(self.model, "image", None)
        return image.backbone if image is not None else self.model.image_module()

    def weights(self) -> str:
        """A digest of the image tower's weights (computed once: the tower is frozen)."""
        if getattr(self, "_weights", None) is None:
            wid = self.model.weights_id
            self._weights = str(wid("image") if callable(wid) else wid)
        return self._weights

    def space(self) -> str:
        """The embedding space its pooled features live in: its teacher's weights (a distilled student), else its
        own weights file (a teacher: what its students record as their teacher's ``weights``)."""
        teacher = getattr(self.model, "teacher_identity", None) or {}
        if teacher.get("weights") and teacher.get("weights") != "unknown":
            return str(teacher["weights"])
        if self.folder is not None and (self.folder / "model.safetensors").is_file():
            if getattr(self, "_space", None) is None:
                from ..teachers.base import file_hash

                self._space = file_hash(self.folder / "model.safetensors")
            return self._space
        return self.weights()

    def width(self) -> int:
        """The width of one feature vector (the embedding, or one patch token)."""
        if self.features == "pooled":
            return int(self.model.embed_dim)
        if getattr(self, "_patch_width", None) is None:
            s = self.preprocess.image_size
            self._patch_width = int(self.encode(torch.zeros(1, 3, s, s, device=self.device)).shape[-1])
        return self._patch_width

    def identity(self) -> dict[str, Any]:
        return {"name": self.name, "weights": self.weights(), "space": self.space(), "features": self.features,
                "width": self.width(), "image_size": int(self.preprocess.image_size)}

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised pixels -> [B, D] unit embeddings (pooled) or [B, N, C] patch tokens (patches)."""
        pixels = pixels.to(self.device)
        if self.features == "pooled":
            return F.normalize(self.model.encode_image(pixels, normalize=False).float(), dim=-1)
        out = self._trunk().forward_features(pixels)
        if out.ndim == 4:  # a CNN's feature map [B, C, H, W] -> one token per position
            return out.flatten(2).transpose(1, 2)
        return out[:, int(getattr(self._trunk(), "num_prefix_tokens", 1)):]  # a ViT's patch tokens, no CLS


def check_tower(trained: dict[str, Any], tower: dict[str, Any]) -> None:
    """Refuse a tower an adapter cannot read, naming the field: another feature kind or width, another
    embedding space (pooled: a student of the same teacher is fine), other weights (patches)."""
    for field in ("features", "width"):
        if trained.get(field) != tower.get(field):
            raise ModelError(f"vision.{field}: the adapter was trained on {trained.get(field)!r} features, the tower "
                             f"{tower.get('name')!r} gives {tower.get(field)!r}: train an adapter on this tower "
                             "(distill adapt vlm.tower=...)")
    field = "space" if trained.get("features") == "pooled" else "weights"
    if trained.get(field) != tower.get(field):
        what = ("embedding space (the teacher it or its teacher is)" if field == "space" else "weights")
        raise ModelError(f"vision.{field}: the adapter was trained on the tower {trained.get('name')!r} "
                         f"({trained.get(field)}); {tower.get('name')!r} has another {what} ({tower.get(field)}): "
                         "train an adapter on this tower (distill adapt vlm.tower=...)")


__all__ = ["VisionTower", "check_tower"]
