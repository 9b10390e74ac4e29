"""Features of other frozen towers kept beside a teacher cache: the pooled embeddings or patch tokens an adapter
reads (``distill adapt`` with ``cache.dir``), computed once per tower and photo, keyed by the photo's content,
and read by every later run of that tower (another LM, another adapter, a subset of the photos).

``<cache>/towers/<tower id>/``: ``tower.json`` (what the tower is) and parts ``part-*.safetensors``, each
``values`` [n, ...] with its photos' content keys and a sha256 of the values in its metadata. A part is written
atomically; one that is damaged or does not match its digest is left out (its photos are computed again).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..io import save_tensors, write_json

log = logging.getLogger("distill")

PART_FORMAT = "clip-distill-tower-features/1"


def _digest(values: torch.Tensor) -> str:
    return hashlib.sha256(values.contiguous().numpy().tobytes()).hexdigest()


class TowerFeatures:
    """The features one tower gave each photo it has seen, under ``<cache_dir>/towers/``.

    Args:
        cache_dir: a teacher cache folder (or any folder the features may live in).
        identity: what makes two towers' features the same (weights, feature kind, input size, ...).
    """

    def __init__(self, cache_dir: str | os.PathLike, identity: dict[str, Any]):
        ident = json.dumps(identity, sort_keys=True)
        self.folder = Path(cache_dir) / "towers" / hashlib.sha256(ident.encode()).hexdigest()[:16]
        self.identity = identity
        self._index: dict[str, tuple[Path, int]] | None = None
        self._digests: dict[Path, str | None] = {}

    def index(self) -> dict[str, tuple[Path, int]]:
        """Content key -> (part, row) of every photo stored in an intact part."""
        if self._index is None:
            from safetensors import safe_open

            self._index, self._digests = {}, {}
            for part in sorted(self.folder.glob("part-*.safetensors")):
                try:
                    with safe_open(str(part), "pt") as f:
                        meta = f.metadata() or {}
                    keys = json.loads(meta.get("keys", "[]"))
                except Exception as e:  # noqa: BLE001 - a damaged part is only lost work: computed again
                    log.warning("%s: unreadable (%s): its photos are computed again", part, type(e).__name__)
                    continue
                self._digests[part] = meta.get("sha256")
                self._index.update((k, (part, i)) for i, k in enumerate(keys))
        return self._index

    def get(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The stored features of those ``keys`` that are stored (and intact)."""
        from ..io import load_tensors

        by_part: dict[Path, list[tuple[str, int]]] = {}
        index = self.index()
        for k in dict.fromkeys(keys):
            if k in index:
                part, row = index[k]
                by_part.setdefault(part, []).append((k, row))
        out: dict[str, torch.Tensor] = {}
        for part, wanted in by_part.items():
            try:
                values = load_tensors(part)["values"]
                if _digest(values) != self._digests.get(part):
                    raise ValueError("its values do not match their sha256")
            except Exception as e:  # noqa: BLE001 - a damaged part is only lost work: computed again
                log.warning("%s: %s: its %d photos are computed again", part, e, len(wanted))
                for k, _ in wanted:
                    self._index.pop(k, None)
                continue
            out.update((k, values[row]) for k, row in wanted)
        return out

    def add(self, keys: Sequence[str], values: torch.Tensor) -> Path | None:
        """Store ``values[i]`` as the features of the photo with content key ``keys[i]`` (one new part)."""
        if not len(keys):
            return None
        if not (self.folder / "tower.json").is_file():
            write_json(self.folder / "tower.json", self.identity)
        values = values.detach().cpu().contiguous()
        part, digest = self.folder / f"part-{time.time_ns()}-{os.getpid()}.safetensors", _digest(values)
        save_tensors(part, {"values": values}, metadata={"format": PART_FORMAT, "keys": json.dumps(list(keys)),
                                                         "sha256": digest})
        if self._index is not None:
            self._digests[part] = digest
            self._index.update((k, (part, i)) for i, k in enumerate(keys))
        return part


__all__ = ["TowerFeatures"]
