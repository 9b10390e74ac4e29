"""The trained part of a vision-language model: a projector from a frozen tower's features into a language
model's token space (and, optionally, LoRA weights of the LM), saved as safetensors + a config that names the
tower and the LM it was trained with, so that it refuses others (``check_tower``, ``check_lm``)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from ..io import load_tensors, save_tensors, write_json

FORMAT = "clip-distill-adapter/1"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter.safetensors"


def pixel_shuffle(tokens: torch.Tensor, merge: int) -> torch.Tensor:
    """[B, N, C] patch tokens on a square grid -> [B, N / merge^2, C * merge^2]: each merge x merge square of
    neighbours becomes one token (nanoVLM / SmolVLM's token merging)."""
    if merge == 1:
        return tokens
    b, n, c = tokens.shape
    side = math.isqrt(n)
    if side * side != n or side % merge:
        raise ModelError(f"vlm.merge: {n} patch tokens are not a square grid whose side divides by {merge}")
    x = tokens.reshape(b, side // merge, merge, side // merge, merge, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, (side // merge) ** 2, merge * merge * c)


class Projector(nn.Module):
    """Features -> LM input embeddings. ``pooled``: [B, D] -> [B, prefix_tokens, H] (ClipCap's MLP);
    ``patches``: [B, N, C] -> [B, N / merge^2, H], one token per (merged) patch (LLaVA-1.5's MLP)."""

    def __init__(self, features: str, width: int, lm_width: int, hidden: int = 1024, prefix_tokens: int = 8,
                 merge: int = 1):
        super().__init__()
        self.features, self.prefix_tokens, self.merge = features, prefix_tokens, merge
        self.lm_width = lm_width
        inp = width * merge * merge if features == "patches" else width
        out = lm_width if features == "patches" else lm_width * prefix_tokens
        self.mlp = nn.Sequential(nn.Linear(inp, hidden), nn.GELU(), nn.Linear(hidden, out))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.features == "patches":
            return self.mlp(pixel_shuffle(feats, self.merge))
        return self.mlp(feats).view(feats.shape[0], self.prefix_tokens, self.lm_width)

    def spec(self) -> dict[str, Any]:
        return {"features": self.features, "width": self.mlp[0].in_features // (self.merge ** 2 if self.features ==
                                                                                 "patches" else 1),
                "lm_width": self.lm_width, "hidden": self.mlp[0].out_features, "prefix_tokens": self.prefix_tokens,
                "merge": self.merge}


def check_lm(trained: dict[str, Any], lm: dict[str, Any]) -> None:
    """Refuse a language model other than the one the adapter was trained into, naming the field."""
    for field in ("hidden_size", "vocab_size", "weights"):
        if trained.get(field) != lm.get(field):
            raise ModelError(f"lm.{field}: the adapter was trained into {trained.get('name')!r} ({field} "
                             f"{trained.get(field)}); {lm.get('name')!r} has {lm.get(field)}: pass the LM the adapter "
                             "was trained with (--lm)")


def portable(path: str | None, folder: Path) -> str | None:
    """A local path relative to ``folder`` (a config never holds a path of this machine); a hub name as is."""
    if not path or not os.path.exists(os.path.expanduser(path)):
        return path
    return os.path.relpath(os.path.abspath(os.path.expanduser(path)), os.path.abspath(folder))


def resolve(path: str | None, folder: Path) -> str | None:
    """The inverse of ``portable``: a relative path is relative to the adapter's folder."""
    if not path or os.path.isabs(path):
        return path
    local = folder / path
    return str(local) if local.exists() or path.startswith(".") else path


def save_adapter(folder: str | os.PathLike, projector: Projector, config: dict[str, Any],
                 lora: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the adapter's weights (projector, and ``lm.``-prefixed LoRA tensors) and config; both files
    atomically, weights first, so a config is never beside weights it does not describe."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"projector.{k}": v.detach().cpu().contiguous() for k, v in projector.state_dict().items()}
    tensors.update({f"lm.{k}": v.detach().cpu().contiguous() for k, v in (lora or {}).items()})
    save_tensors(folder / WEIGHTS, tensors)
    write_json(folder / CONFIG, {"format": FORMAT, **config, "projector": projector.spec()})
    return folder


def adapter_folder(path: str | os.PathLike) -> Path:
    """The adapter a path names: the folder itself, or a run folder's ``adapter/``."""
    folder = Path(os.path.expanduser(str(path)))
    if not (folder / CONFIG).is_file() and (folder / "adapter" / CONFIG).is_file():
        return folder / "adapter"
    return folder


def read_adapter(folder: str | os.PathLike) -> tuple[dict[str, Any], Projector, dict[str, torch.Tensor]]:
    """(config, projector with its weights, LoRA tensors of the LM) of a saved adapter (or a run folder's);
    no LM or tower is loaded. A damaged or foreign folder is one line naming the file and what is wrong."""
    from ..io import read_format_json

    folder = adapter_folder(folder)
    cfg = read_format_json(folder / CONFIG, FORMAT, "`distill adapt` writes an adapter in <output_dir>/adapter")
    try:
        spec = cfg["projector"]
        projector = Projector(spec["features"], int(spec["width"]), int(spec["lm_width"]), int(spec["hidden"]),
                              int(spec["prefix_tokens"]), int(spec["merge"]))
        for part in ("vision", "lm", "prompt"):
            if not isinstance(cfg[part], dict):
                raise TypeError(f"{part} is not a mapping")
    except (KeyError, TypeError, ValueError) as e:
        raise ModelError(f"{folder / CONFIG}: damaged or incomplete ({type(e).__name__}: {e}); train or copy the "
                         "adapter again") from None
    tensors = load_tensors(folder / WEIGHTS)
    try:
        projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items() if k.startswith("projector.")})
    except RuntimeError as e:
        raise ModelError(f"{folder / WEIGHTS}: its weights do not match {CONFIG}'s projector "
                         f"({str(e).splitlines()[-1].strip()}); train or copy the adapter again") from None
    return cfg, projector, {k[len("lm."):]: v for k, v in tensors.items() if k.startswith("lm.")}


__all__ = ["Projector", "pixel_shuffle", "check_lm", "save_adapter", "read_adapter", "adapter_folder", "portable",
           "resolve", "FORMAT"]
