"""What a tower can be asked to do when it is trained, as open_clip's towers carry ``lock()``: lock its body
(optionally its head stays trainable, optionally its last blocks train too), name its blocks, take LoRA
adapters and fold them in. Every tower class mixes this in and names its body (``backbone``)."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from .._imports import require
from ..errors import RecipeError


class TowerRoles:
    """Mixed into the towers; ``backbone_attr`` names the body (the timm trunk, the text encoder)."""

    backbone_attr = "trunk"

    @property
    def backbone(self) -> nn.Module:
        return getattr(self, self.backbone_attr)

    @property
    def head(self) -> nn.Module | None:
        head = getattr(self, "proj", None)
        return head if isinstance(head, nn.Linear) else None

    @property
    def arch(self) -> str:
        return str(getattr(self, "spec", {}).get("arch", type(self).__name__))

    def lock(self, head: bool = False, unfreeze_last: int = 0) -> list[str]:
        """Freeze the tower: ``head`` keeps its projection trainable, ``unfreeze_last`` its last N blocks.
        Returns the names of the parameters left trainable (as ``named_parameters`` of the tower)."""
        self.requires_grad_(False)
        if head:
            if self.head is None:
                raise RecipeError(f"tune.lock: the {self.arch} tower has no projection head of its own to train "
                                  "(an open_clip text tower keeps its own); use tune.lock=text or image")
            self.head.requires_grad_(True)
        if unfreeze_last:
            self.unfreeze_last(unfreeze_last)
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def blocks(self) -> list[list[str]]:
        """Parameter names of the body's blocks (relative to the body), in order."""
        body = self.backbone
        if hasattr(body, "group_matcher"):  # timm
            from timm.models import group_parameters

            groups = list(group_parameters(body, body.group_matcher(coarse=False)).values())
            return groups[1:]  # group 0 is the stem
        for path in ("encoder.layer", "layers", "transformer.resblocks", "encoder.layers"):  # HF BERT-like, open_clip
            mod = body
            for attr in path.split("."):
                mod = getattr(mod, attr, None)
            if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod):
                return [[f"{path}.{i}.{n}" for n, _ in block.named_parameters()] for i, block in enumerate(mod)]
        return []

    def unfreeze_last(self, n: int) -> list[str]:
        """Let the last ``n`` blocks of the body train (timm's fine-grained parameter groups for image trunks,
        whose last group also holds the final norm / head conv; the last transformer layers of a text
        encoder). Returns the names of the body's parameters made trainable."""
        groups = self.blocks()
        if not groups:
            raise RecipeError(f"tune.unfreeze_last: {self.arch} does not name its blocks; use tune.unfreeze_last=0 "
                              "(or tune.lock=lora)")
        if n > len(groups):
            raise RecipeError(f"tune.unfreeze_last: {n}, but {self.arch} has {len(groups)} blocks")
        params = dict(self.backbone.named_parameters())
        names = [name for group in groups[-n:] for name in group]
        for name in names:
            params[name].requires_grad_(True)
        return names

    def add_lora(self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = ()) -> None:
        """Wrap the body with peft LoRA adapters (its base weights frozen; the head stays trainable)."""
        peft = require("peft", "tune.lock=lora")
        body = self.backbone
        cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                              target_modules=list(targets) or _linear_names(body))
        body.requires_grad_(False)
        setattr(self, self.backbone_attr, peft.get_peft_model(body, cfg))
        if self.head is not None:
            self.head.requires_grad_(True)

    def merge_lora(self) -> None:
        """Fold LoRA adapters into the base weights (in place): a plain tower, loadable without peft."""
        if hasattr(self.backbone, "merge_and_unload"):
            setattr(self, self.backbone_attr, self.backbone.merge_and_unload())


def _linear_names(module: nn.Module) -> list[str]:
    """Names of the Linear layers of a body (Conv2d for CNNs that have none)."""
    # nn.MultiheadAttention reads its out_proj weight directly, so an adapter there would be ignored
    inside_mha = {f"{n}.out_proj" for n, m in module.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for kind in (nn.Linear, nn.Conv2d):
        names = [n for n, m in module.named_modules() if isinstance(m, kind) and n and n not in inside_mha]
        if names:
            return names
    raise RecipeError("tune.lock: lora needs a Linear or Conv2d layer to put adapters on; this tower has none")


__all__ = ["TowerRoles"]
