"""Image preprocessing with replayable crops.

A view is a crop box in *fractions* of the original image plus a flip bit. The same
``View`` applied at the teacher's resolution/normalisation and at the student's gives
the two models exactly the same content, whatever size each of them expects.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # torch loads where tensors are made: the ONNX runtime uses this module without it
    import torch

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PreprocessCfg:
    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"  # bicubic | bilinear
    resize_mode: str = "shortest"  # shortest: resize + centre crop; squash: resize the whole image

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PreprocessCfg":
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class View:
    """Crop box (x0, y0, w, h) as fractions of the image, and a horizontal flip."""

    x0: float
    y0: float
    w: float
    h: float
    flip: bool = False

    def as_array(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.w, self.h, float(self.flip)], dtype=np.float32)

    @classmethod
    def from_array(cls, a: Sequence[float]) -> "View":
        return cls(float(a[0]), float(a[1]), float(a[2]), float(a[3]), bool(a[4] > 0.5))


def eval_view(width: int, height: int, resize_mode: str = "shortest", size: int | None = None) -> View:
    """The eval transform as a view: the whole image (squash), or the centre crop (shortest). With the output
    ``size`` the crop is exactly CLIP's and open_clip's (resize the short side to ``size``, then centre-crop
    ``size`` x ``size``, with torchvision's rounding), so the pixels equal theirs; without it, the centred
    square of the original."""
    if resize_mode == "squash":
        return View(0.0, 0.0, 1.0, 1.0)
    if size is None:
        side = min(width, height)
        return View((width - side) / 2 / width, (height - side) / 2 / height, side / width, side / height)
    # torchvision Resize(size) on a PIL image, then CenterCrop(size): the crop in the resized image's pixels
    new_w, new_h = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return View(left / new_w, top / new_h, min(size, new_w) / new_w, min(size, new_h) / new_h)


def random_view(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> View:
    """Random-resized-crop parameters (torchvision's algorithm) as a replayable View."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = math.sqrt(target * aspect)
        h = math.sqrt(target / aspect)
        if 0 < w <= width and 0 < h <= height:
            x0 = rng.uniform(0, width - w)
            y0 = rng.uniform(0, height - h)
            return View(x0 / width, y0 / height, w / width, h / height, bool(flip and rng.random() < 0.5))
    v = eval_view(width, height)  # fallback, as torchvision does: centre crop
    return View(v.x0, v.y0, v.w, v.h, bool(flip and rng.random() < 0.5))


def to_rgb(image):
    """Any PIL image -> RGB: transparent areas become white (not black, as a plain ``convert`` does),
    16-bit and 32-bit greys are scaled to 8 bits (not clipped), CMYK/palette/grey converted."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(image, dtype=np.float64)
        peak = float(a.max()) if a.size else 0.0
        # the range the pixels were stored in: 16-bit files (the usual source of these modes) span 65535
        top = 65535.0 if image.mode.startswith("I;16") else next(
            (t for t in ((1.0,) if image.mode == "F" else ()) + (255.0, 65535.0) if peak <= t), max(peak, 1.0))
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "P", "PA", "RGBa", "La") or "transparency" in image.info:
        image = image.convert("RGBA")
        bg = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, image).convert("RGB")
    return image.convert("RGB")


_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL.Image.Resampling values


def crop_resize(image, view: View, size: int, interpolation: str = "bicubic") -> np.ndarray:
    """Crop ``view`` out of a PIL image, resize to ``size`` x ``size`` and flip -> uint8 [S, S, 3]."""
    if image.mode != "RGB":
        image = to_rgb(image)
    W, H = image.size
    box = (view.x0 * W, view.y0 * H, (view.x0 + view.w) * W, (view.y0 + view.h) * H)
    out = image.resize((size, size), resample=_RESAMPLE[interpolation], box=box)
    if view.flip:
        out = out.transpose(0)  # FLIP_LEFT_RIGHT
    return np.array(out, copy=True)


def apply_view(image, view: View, cfg: PreprocessCfg) -> "torch.Tensor":
    """Crop ``view`` out of a PIL image, resize to ``cfg.image_size``, flip, normalise -> [3, S, S]."""
    return to_tensor(crop_resize(image, view, cfg.image_size, cfg.interpolation), cfg)


def crop_uint8(image, view: View, cfg: PreprocessCfg) -> "torch.Tensor":
    """``apply_view`` without the normalisation: uint8 [3, S, S]. DataLoader workers send these (4x
    fewer bytes than float, no per-pixel float work there); ``normalize`` runs on the device."""
    import torch

    return torch.from_numpy(crop_resize(image, view, cfg.image_size, cfg.interpolation)).permute(2, 0, 1)


def normalize(pixels: "torch.Tensor", cfg: PreprocessCfg) -> "torch.Tensor":
    """uint8 [N, 3, S, S] (on any device) -> normalised float, as ``to_tensor`` does per image."""
    import torch

    mean = torch.tensor(cfg.mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float().div_(255.0) - mean) / std


def to_array(array: np.ndarray, cfg: PreprocessCfg) -> np.ndarray:
    """uint8 HWC array -> normalised float32 CHW array."""
    x = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)
    mean = np.asarray(cfg.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(cfg.std, dtype=np.float32).reshape(3, 1, 1)
    return (x - mean) / std


def to_tensor(array: np.ndarray, cfg: PreprocessCfg) -> "torch.Tensor":
    """uint8 HWC array -> normalised float CHW tensor."""
    import torch

    return torch.from_numpy(to_array(array, cfg))


def eval_array(image, cfg: PreprocessCfg) -> np.ndarray:
    """PIL image -> normalised float32 CHW array with the eval view (no torch needed)."""
    image = to_rgb(image)
    view = eval_view(*image.size, cfg.resize_mode, cfg.image_size)
    return to_array(crop_resize(image, view, cfg.image_size, cfg.interpolation), cfg)


def eval_transform(cfg: PreprocessCfg):
    """PIL image -> tensor with the eval view (what a teacher/student sees at inference)."""

    def transform(image) -> "torch.Tensor":
        image = to_rgb(image)
        return apply_view(image, eval_view(*image.size, cfg.resize_mode, cfg.image_size), cfg)

    return transform
