"""What a frozen tower computes once and a run reads many times: a table of its outputs per distinct image (or
caption), and the dataset of rows that indexes it. Locked-tower tuning (``distill tune``, lock=both) and adapter
training (``distill adapt``) both train on such tables instead of running the frozen tower every step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from .data import PairDataset, Rows, make_collate
from .data.packed import image_reader
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


__all__ = ["FrozenTable", "TableRows", "image_table"]
