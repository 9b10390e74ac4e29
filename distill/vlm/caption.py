"""Caption (or answer a prompt about) photos with a saved adapter: the tower's features of each photo once,
then batched generation. Photos that cannot be opened are skipped and listed, as in training."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..data import IMAGE_EXTS, Rows
from ..errors import DataError, ModelError
from ..features import image_table
from .lm import ChatPrompt
from .model import VisionLanguageModel
from .tower import VisionTower, check_tower



@dataclass
class Captions:
    """``captions[i]`` answers ``paths[i]``; ``skipped``: ``{path: why}`` of the photos that could not be read."""

    paths: list[str]
    captions: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


def photo_paths(items: Sequence[str] | str) -> list[str]:
    """Image paths from photo files, folders (recursive) or data files: each folder or data file read as
    ``distill.data.photo_paths`` reads it (``distill index`` reads its source the same way)."""
    from ..data import photo_paths as photos_of

    out: list[str] = []
    for item in [items] if isinstance(items, (str, os.PathLike)) else items:
        path = os.path.expanduser(str(item))
        out += [path] if path.lower().endswith(IMAGE_EXTS) and not os.path.isdir(path) else photos_of(path)
    return out


def tower_features(tower: VisionTower, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0,
                   progress: bool = True, device: str | torch.device = "cpu") -> tuple[list[str], torch.Tensor,
                                                                                     dict[str, str]]:
    """(readable paths, their features [N, ...], {unreadable path: why}) by the frozen tower."""
    rows = Rows(list(paths), [None] * len(paths))
    tower.model.to(device)
    table, bad = image_table(rows, tower.preprocess, tower.encode, device, num_workers, batch_size=batch_size,
                             progress=progress, desc=f"tower {tower.name}")
    good = [i for i in range(len(paths)) if i in table.rows]
    feats = table.values[torch.tensor([table.rows[i] for i in good], dtype=torch.long)] if good else table.values
    return [paths[i] for i in good], feats, {paths[i]: why for i, why in bad.items()}


def caption_images(vlm: VisionLanguageModel, images: Sequence[str] | str, tower: Any = None,
                   prompt: str | None = None, max_new_tokens: int = 40, sample: bool = False,
                   temperature: float = 1.0, top_p: float = 0.9, batch_size: int = 16, seed: int = 0,
                   progress: bool = True, features: torch.Tensor | None = None) -> Captions:
    """Generate one answer per photo. ``tower``: a VisionTower or a folder (default: the one the adapter was
    trained on); a tower of another space, width or kind is refused, naming the field. ``prompt``: another
    question than the one trained with. ``features``: [N, ...] already computed for ``images`` (a list)."""
    if features is None:
        if tower is None:
            tower = vlm.vision.get("path")
            if not tower:
                raise ModelError("--tower: the adapter names no tower folder; pass the tower to look through")
        if not isinstance(tower, VisionTower):
            if not os.path.exists(os.path.expanduser(str(tower))):
                named = "the tower the adapter's config names (vision.path)" if tower == vlm.vision.get("path") else \
                    "the tower"
                raise ModelError(f"--tower: {named} is not at {tower}; pass the tower to look through (--tower, or "
                                 "caption_images(..., tower=...))")
            tower = VisionTower.load(tower, vlm.vision.get("features", "pooled"))
        check_tower(vlm.vision, tower.identity())
        found = photo_paths(images)
        if not found:
            raise DataError(f"{images if isinstance(images, (str, os.PathLike)) else 'the photos given'}: no photos "
                            f"found (files ending in {', '.join(IMAGE_EXTS)}, folders of them, or a data file)")
        paths, features, skipped = tower_features(tower, found, progress=progress)
        if not paths:
            first = next(iter(skipped.items()))
            raise DataError(f"no photo of the {len(skipped)} given could be read ({first[0]}: {first[1]})")
    else:
        paths, skipped = list(images), {}
    chat = vlm.chat
    if prompt is not None and prompt != vlm.prompt_text:
        vlm.chat = ChatPrompt.build(vlm.tokenizer, prompt, vlm.system)
    try:
        texts = vlm.generate(features, max_new_tokens, sample, temperature, top_p, batch_size, seed, progress)
    finally:
        vlm.chat = chat
    return Captions(paths, texts, skipped)


__all__ = ["Captions", "caption_images", "photo_paths", "tower_features"]
