"""What a frozen tower computes once and a run reads many times: a table of its outputs per distinct image (or
caption), and the dataset of rows that indexes it. Locked-tower tuning (``distill tune``, lock=both) and adapter
training (``distill adapt``) both train on such tables instead of running the frozen tower every step."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .data import PairDataset, Rows, make_collate
from .data.packed import image_reader
from .io import load_tensors, save_tensors
from .progress import track
from .transforms import PreprocessCfg, normalize


@dataclass
class FrozenTable:
    """Outputs of a locked tower computed once: ``rows`` maps a key (a caption, or a dataset row for
    images) to a row of ``values``; ``head``: the values are trunk features, the tower's head still applies."""

    rows: dict[Any, int]
    values: torch.Tensor
    head: bool = False


class TableRows(torch.utils.data.Dataset):
    """Rows by index and caption only (the frozen tower's outputs come from a table); rows whose image could
    not be read come back as skipped (``make_collate`` lists them)."""

    def __init__(self, rows: Rows, bad: dict[int, str]):
        self.rows, self.bad = rows, bad

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int) -> dict[str, Any]:
        i = int(key) % len(self.rows)
        if i in self.bad:
            return {"index": i, "skip": self.bad[i]}
        return {"index": i, "caption": self.rows.captions[i]}


@torch.no_grad()
def image_table(rows: Rows, preprocess: PreprocessCfg, encode: Callable[[torch.Tensor], torch.Tensor],
                device: torch.device | str = "cpu", num_workers: int = 0, packed: str | None = None,
                batch_size: int = 64, progress: bool = True, desc: str = "frozen image tower",
                ) -> tuple[FrozenTable, dict[int, str]]:
    """``encode(normalised pixels) -> [B, ...]`` of each distinct image of ``rows`` once (eval view, no
    augmentation). Returns the table (dataset row -> row of values) and ``{row: why}`` of the rows whose image
    could not be read."""
    unique = list(dict.fromkeys(p for p in rows.images if p))
    data = PairDataset(Rows(unique, [None] * len(unique), source=rows.source), {"v": preprocess},
                       augment=False, reader=image_reader(packed))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=make_collate({}))
    values: torch.Tensor | None = None
    bad: dict[str, str] = {}
    for batch in track(loader, desc=desc, unit="batch", enabled=progress):
        bad.update({unique[i]: why for i, why in batch["skipped"]})
        if "index" in batch:
            out = encode(normalize(batch["views"]["v"].to(device), preprocess)).float().cpu()
            if values is None:
                values = torch.zeros(len(unique), *out.shape[1:])
            values[batch["index"]] = out
    where = {p: i for i, p in enumerate(unique)}
    table = FrozenTable({i: where[p] for i, p in enumerate(rows.images) if p and p not in bad},
                        values if values is not None else torch.zeros(0), head=False)
    return table, {i: bad[p] for i, p in enumerate(rows.images) if p in bad}


def stored_image_table(rows: Rows, store: Any, preprocess: PreprocessCfg,
                       encode: Callable[[torch.Tensor], torch.Tensor], write: bool = True, **kwargs: Any,
                       ) -> tuple[FrozenTable, dict[int, str]]:
    """``image_table`` through ``store`` (a ``cache.towers.TowerFeatures``): photos it holds (by content) are read,
    the others encoded and, with ``write``, added to it. ``kwargs`` go to ``image_table``."""
    from .cache.keys import image_keys

    unique = list(dict.fromkeys(p for p in rows.images if p))
    keys = dict(zip(unique, image_keys(unique, progress=kwargs.get("progress", True))[0]))
    found = store.get(list(keys.values()))
    todo = [p for p in unique if keys[p] not in found]
    bad: dict[str, str] = {}
    if todo:
        table, skipped = image_table(Rows(todo, [None] * len(todo), source=rows.source), preprocess, encode,
                                     **kwargs)
        new = {keys[todo[i]]: table.values[j] for i, j in table.rows.items()}
        if write and new:
            store.add(list(new), torch.stack(list(new.values())))
        found.update(new)
        bad = {todo[i]: why for i, why in skipped.items()}
    order = list(dict.fromkeys(keys[p] for p in unique if p not in bad))
    where = {k: j for j, k in enumerate(order)}
    values = torch.stack([found[k] for k in order]) if order else torch.zeros(0)
    table = FrozenTable({i: where[keys[p]] for i, p in enumerate(rows.images) if p and p not in bad}, values)
    return table, {i: bad[p] for i, p in enumerate(rows.images) if p in bad}


def read_tables(path: Path, key: str) -> tuple[dict[str, torch.Tensor], dict[int, str]] | None:
    """Tables a run stored (``write_tables``) for ``key`` (what they were computed from: towers, data), with
    ``{row: why}`` of the rows left out; None when the file is absent or was computed from something else."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        return load_tensors(path), {int(i): why for i, why in json.loads(meta.get("bad", "{}")).items()}
    except Exception as e:  # noqa: BLE001 - a damaged store is only a cache: computed again
        import logging

        logging.getLogger(__name__).warning("%s cannot be read (%s: %s): computing its tables again", path,
                                            type(e).__name__, str(e)[:100])
        return None


def write_tables(path: Path, key: str, tensors: dict[str, torch.Tensor], bad: dict[int, str]) -> None:
    """Store tables under ``key`` (atomically; the main process only: every process computed the same)."""
    from . import dist

    if dist.is_main():
        save_tensors(path, {k: v.contiguous() for k, v in tensors.items()}, metadata={"key": key,
                                                                                   "bad": json.dumps(bad)})


def table_rows(table: FrozenTable, n: int) -> torch.Tensor:
    """``[n]`` the row of ``table`` each dataset row reads (-1: none), to store beside its values."""
    return torch.tensor([table.rows.get(i, -1) for i in range(n)])


def rows_of(index: torch.Tensor) -> dict[int, int]:
    """The inverse of ``table_rows``: dataset row -> table row, for the rows that have one."""
    return {i: int(j) for i, j in enumerate(index.tolist()) if j >= 0}


__all__ = ["FrozenTable", "TableRows", "image_table", "read_tables", "write_tables", "table_rows", "rows_of"]
