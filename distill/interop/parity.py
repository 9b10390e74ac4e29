"""What every format's parity check is made of: inputs (the user's data, or generated stand-ins) and the
per-sample agreement of two embedding sets."""
from __future__ import annotations

from typing import Any

import numpy as np

CALIBRATION_TEXTS = (
    "a photo of a dog", "a red car parked on the street", "two children playing football on the beach",
    "a bowl of fruit on a wooden table", "an aerial view of a city at night", "a black and white cat",
    "a man riding a bicycle", "a plate of pasta", "snow-covered mountains under a blue sky",
    "a close-up of a flower", "people waiting at a train station", "a small boat on a lake",
)


def sample_rows(rows: Any, limit: int, seed: int, skip: int = 0) -> Any:
    """``limit`` rows with distinct images (rows sharing an image count once), taken from a seeded
    permutation after its first ``skip``: two calls with different ``skip`` share no image."""
    first: dict[Any, int] = {}
    for i, key in enumerate(rows.images if rows.has_images else [None] * len(rows)):
        first.setdefault(key if key else ("row", i), i)
    index = np.fromiter(first.values(), dtype=np.int64)
    pick = index[np.random.default_rng(seed).permutation(len(index))[skip:skip + limit]]
    return rows.subset(sorted(pick.tolist()))


def stand_in_images(size: int, seed: int, n: int = 16) -> list:
    """Smooth random images (closer to photos than white noise), 3:2 and larger than the student's
    input, so resizing and cropping are exercised too."""
    from PIL import Image

    low = np.random.default_rng(seed).uniform(0, 255, (n, 8, 12, 3)).astype(np.uint8)
    return [Image.fromarray(a).resize((size * 3, size * 2), Image.BICUBIC) for a in low]


def parity_images(student: Any, rows: Any = None, seed: int = 0, stand_ins: int = 16) -> list:
    """PIL images to check an image tower on: the rows' images, or ``stand_ins`` generated ones."""
    from ..data import open_image

    if rows is not None and rows.has_images:
        return [open_image(p) for p in rows.images if p]
    return stand_in_images(student.preprocess.image_size, seed, stand_ins)


def calibration_inputs(student: Any, data: Any = None, limit: int = 64, seed: int = 0, skip: int = 0,
                       stand_ins: int = 16):
    """(images: [N, 3, S, S] float32 pixels or None, texts: list[str] or None, rows or None) from
    ``limit`` distinct images of the user's data (after ``skip`` of the same seeded permutation), or
    ``stand_ins`` generated images and built-in captions when no data is given."""
    from ..data import as_rows
    from ..transforms import eval_array

    rows = sample_rows(as_rows(data), limit, seed, skip) if data is not None else None
    images = texts = None
    if student.image is not None:
        pil = parity_images(student, rows, seed, stand_ins)
        images = np.stack([eval_array(im, student.preprocess) for im in pil])
    if student.text is not None:
        texts = [c for c in rows.captions if c] if rows is not None and rows.has_text else list(CALIBRATION_TEXTS)
    return images, texts, rows


def agreement(ref: Any, got: Any) -> dict[str, Any]:
    """Per-sample cosine (mean, 1st percentile, min) and max abs error of two [N, D] embedding sets."""
    ref, got = np.asarray(ref, dtype=np.float64), np.asarray(got, dtype=np.float64)
    c = (ref * got).sum(-1) / (np.linalg.norm(ref, axis=-1) * np.linalg.norm(got, axis=-1))
    return {"n": len(c), "mean_cosine": float(c.mean()), "p1_cosine": float(np.percentile(c, 1)),
            "min_cosine": float(c.min()), "max_abs_err": float(np.abs(ref - got).max())}


__all__ = ["CALIBRATION_TEXTS", "sample_rows", "stand_in_images", "parity_images", "calibration_inputs", "agreement"]
