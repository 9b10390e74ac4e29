"""A pre-resized image store: decode every image once, read bytes at training time.

``distill data pack SOURCE --size 224 --out DIR`` squashes each image to ``size`` x ``size``
uint8 and writes memory-mapped shards (``images_00000.npy``, [N, S, S, 3]) plus ``index.json``
(path -> shard, row, original width and height). Views are fractions of the image, so a crop
computed from the original size and applied to the squashed copy covers the same region: the
teacher cache's stored views replay exactly on packed images, only resampled from fewer pixels.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_format_json, write_json
from .images import open_image, read_errors

log = logging.getLogger(__name__)
PACK_FORMAT = "clip-distill-pack/1"


def _decode(args: tuple[str, int]) -> tuple[np.ndarray | None, tuple[int, int], str | None]:
    from PIL import Image

    path, size = args
    try:
        image = open_image(path)
    except read_errors() as e:  # reported, never fatal
        return None, (0, 0), f"{type(e).__name__}: {e}"
    return np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8), image.size, None


@dataclass
class PackSummary:
    path: Path
    images: int
    skipped: list[dict[str, str]]
    bytes: int


def pack_images(source: Any, out: str | os.PathLike, size: int = 224, shard_size: int = 8192,
                workers: int | None = None, progress: bool = True, overwrite: bool = False) -> PackSummary:
    """Decode the unique images of ``source`` once into a packed store at ``out`` (a new folder, or with
    ``overwrite`` one holding another clip-distill artifact; never one that holds the images)."""
    from ..outputs import claim, image_folders, inputs_of, staged
    from .sources import as_rows

    rows = as_rows(source)
    paths = list(dict.fromkeys(p for p in rows.images if p))
    if not paths:
        from ..errors import DataError

        raise DataError(f"{rows.source}: no images to pack")
    claim(out, "a packed image store", inputs_of({"the data": source if isinstance(source, (str, os.PathLike)) else None,
                                                  "an image folder of the data": image_folders(paths)}),
          overwrite=overwrite)
    with staged(out) as tmp:
        summary = _pack(paths, tmp, size, shard_size, workers, progress)
    if summary.skipped:
        log.warning("pack: %d unreadable images skipped (listed in %s)", len(summary.skipped), Path(out) / "index.json")
    return PackSummary(Path(out), summary.images, summary.skipped, summary.bytes)


def _pack(paths: list[str], out: Path, size: int, shard_size: int, workers: int | None,
          progress: bool) -> PackSummary:
    from ..io import atomic_write
    from ..progress import progress as report

    index: dict[str, list[int]] = {}
    skipped, shard, buf, total = [], 0, [], 0

    def flush():
        nonlocal shard, buf, total
        if buf:
            arr = np.stack(buf)
            atomic_write(out / f"images_{shard:05d}.npy", lambda f: np.save(f, arr))
            total += arr.nbytes
            shard, buf = shard + 1, []

    workers = workers or min(8, os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool, report(len(paths), "pack", "img",
                                                       enabled=progress) as bar:
        for path, (arr, (w, h), err) in zip(paths, pool.map(_decode, [(p, size) for p in paths], chunksize=32)):
            bar.update(1)
            if err is not None:
                skipped.append({"image": path, "reason": err})
                continue
            index[path] = [shard, len(buf), w, h]
            buf.append(arr)
            if len(buf) == shard_size:
                flush()
    flush()
    write_json(out / "index.json", {"format": PACK_FORMAT, "size": size, "shards": shard, "images": index,
                                    "skipped": skipped})
    return PackSummary(out, len(index), skipped, total)


class PackedImages:
    """Reads a packed store: ``open(path) -> (PIL image S x S, original (width, height))``.

    Shards are memory-mapped, so DataLoader workers share the page cache instead of copies.
    Paths the store lacks fall back to decoding the original file."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta = read_format_json(self.folder / "index.json", PACK_FORMAT, "make one with `distill data pack`")
        self.size = int(meta["size"])
        self.index: dict[str, list[int]] = meta["images"]
        self._shards: dict[int, np.ndarray] = {}
        self._check(int(meta["shards"]))

    def _check(self, shards: int) -> None:
        """Every shard must open with the rows the index points at: a damaged store names its shard
        (instead of every image in it being skipped as if the photos were broken)."""
        from ..errors import FileFormatError

        need = [0] * shards
        for shard, row, _, _ in self.index.values():
            need[shard] = max(need[shard], row + 1)
        for n in range(shards):
            f = self.folder / f"images_{n:05d}.npy"
            try:
                arr = np.load(f, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:  # missing, truncated, header damaged
                raise FileFormatError(f"{f}: the packed store is damaged ({type(e).__name__}: {str(e)[:80]}); pack "
                                      "the images again with `distill data pack`") from None
            if arr.ndim != 4 or arr.shape[1:] != (self.size, self.size, 3) or len(arr) < need[n]:
                raise FileFormatError(f"{f}: shape {arr.shape}, expected [{need[n]}+, {self.size}, {self.size}, 3]; "
                                      "pack the images again with `distill data pack`")

    def __contains__(self, path: str) -> bool:
        return path in self.index

    def __len__(self) -> int:
        return len(self.index)

    def array(self, path: str) -> tuple[np.ndarray, tuple[int, int]]:
        shard, row, w, h = self.index[path]
        if shard not in self._shards:
            self._shards[shard] = np.load(self.folder / f"images_{shard:05d}.npy", mmap_mode="r")
        return self._shards[shard][row], (w, h)

    def open(self, path: str):
        from PIL import Image

        if path not in self.index:
            image = open_image(path)
            return image, image.size
        arr, size = self.array(path)
        return Image.fromarray(np.ascontiguousarray(arr)), size


def image_reader(packed: str | os.PathLike | None):
    """The reader of a run's images: a ``PackedImages`` store when one is named (``data.packed``), else None
    (the original files are decoded)."""
    return PackedImages(packed) if packed else None
