"""``distill data check``: open every image fully, find what would break or spoil training.

Rejected rows (written to ``rejected.jsonl`` with their reason): missing files, empty (0-byte)
files, corrupt or truncated images, images too small or too large to use, rows without a caption
in caption data. Reported but kept (``report.json`` notes): CMYK / palette / alpha / grey modes
(converted to RGB, alpha onto white), duplicate images by content hash, over-long captions
(truncated by the tokenizer). ``clean.jsonl`` lists the usable rows, ready for ``distill fit``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import Rows, as_rows
from .io import atomic_write_bytes, write_json

NOTE_MODES = {"CMYK": "CMYK image (converted to RGB)", "P": "palette image (converted to RGB)",
              "RGBA": "image with alpha (composited onto white)", "LA": "grey image with alpha (composited onto white)",
              "PA": "palette image with alpha (composited onto white)", "L": "greyscale image (converted to RGB)",
              "I;16": "16-bit image (converted to RGB)", "I": "32-bit image (converted to RGB)"}


@dataclass
class ImageInfo:
    path: str
    error: str | None = None
    width: int = 0
    height: int = 0
    mode: str = ""
    sha: str = ""


def inspect_image(path: str) -> ImageInfo:
    """Decode ``path`` fully (truncation shows only then) and hash its bytes."""
    from PIL import Image

    from .data import _image_bytes

    plain = "::" not in path and not path.startswith("hf://")
    if plain and not os.path.exists(path):
        return ImageInfo(path, "missing file")
    if plain and os.path.getsize(path) == 0:
        return ImageInfo(path, "empty file (0 bytes)")
    try:
        src = _image_bytes(path) if not plain else open(path, "rb")
        if hasattr(src, "convert"):  # a decoded dataset image
            im, data = src, src.tobytes()
        else:
            with src:
                data = src.read()
            import io

            im = Image.open(io.BytesIO(data))
            im.load()  # raises on truncated data
        return ImageInfo(path, None, im.width, im.height, im.mode, hashlib.sha1(data).hexdigest())
    except Exception as e:
        return ImageInfo(path, f"corrupt or truncated image ({type(e).__name__}: {str(e)[:120]})")


@dataclass
class CheckReport:
    rows: int
    clean: int
    rejected: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r["reason"].split(" (")[0] for r in self.rejected)
        c.update(n["problem"].split(" (")[0] for n in self.notes)
        return dict(c)

    def summary(self) -> str:
        lines = [f"{self.rows} rows: {self.clean} usable, {len(self.rejected)} rejected, {len(self.notes)} notes"]
        lines += [f"  {n:6d}  {what}" for what, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def check_data(source: Any, out: str | os.PathLike | None = None, workers: int | None = None,
               min_side: int = 16, max_pixels: int = 89_478_485, max_words: int = 60,
               progress: bool = True) -> CheckReport:
    """Scan every row of ``source``; write ``clean.jsonl``, ``rejected.jsonl`` and ``report.json``
    into ``out`` when given. ``max_pixels`` is PIL's decompression-bomb limit."""
    from tqdm.auto import tqdm

    rows: Rows = as_rows(source)
    paths = list(dict.fromkeys(p for p in rows.images if p))
    workers = workers or min(8, os.cpu_count() or 1)
    info: dict[str, ImageInfo] = {}
    if paths:
        with ProcessPoolExecutor(workers) as pool, tqdm(total=len(paths), desc="check", unit="img",
                                                         disable=not progress) as bar:
            for i in pool.map(inspect_image, paths, chunksize=16):
                info[i.path] = i
                bar.update(1)
    notes, first_of = [], {}
    for p in paths:
        i = info[p]
        if i.error is None:
            if min(i.width, i.height) < min_side:
                i.error = f"image too small ({i.width}x{i.height}, under {min_side} px)"
            elif i.width * i.height > max_pixels:
                i.error = f"image too large ({i.width}x{i.height}, over {max_pixels} pixels)"
        if i.error is not None:
            continue
        if i.mode in NOTE_MODES:
            notes.append({"image": p, "problem": NOTE_MODES[i.mode]})
        if i.sha in first_of:
            notes.append({"image": p, "problem": f"duplicate image (same bytes as {first_of[i.sha]})"})
        else:
            first_of[i.sha] = p
    pair_data = rows.has_text
    clean, rejected = [], []
    for k, (p, c) in enumerate(zip(rows.images, rows.captions)):
        reason = info[p].error if p else None
        if reason is None and pair_data and not (c or "").strip():
            reason = "empty caption"
        if reason is None and not p and not (c or "").strip():
            reason = "neither image nor caption"
        record = {"image": p, "caption": c}
        if rows.labels is not None:
            record["label"] = rows.classes[rows.labels[k]] if rows.classes else rows.labels[k]
        if reason is not None:
            rejected.append({**record, "reason": reason, "row": k})
            continue
        if c and len(c.split()) > max_words:
            notes.append({"image": p, "caption": c[:80], "row": k,
                          "problem": f"over-long caption ({len(c.split())} words; the tokenizer truncates it)"})
        clean.append(record)
    report = CheckReport(len(rows), len(clean), rejected, notes)
    if out is not None:
        out = Path(out)
        dump = lambda recs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")  # noqa: E731
        atomic_write_bytes(out / "clean.jsonl", dump(clean))
        atomic_write_bytes(out / "rejected.jsonl", dump(rejected))
        write_json(out / "report.json", {"source": rows.source, "rows": report.rows, "clean": report.clean,
                                         "rejected": len(rejected), "counts": report.counts, "notes": notes})
    return report
