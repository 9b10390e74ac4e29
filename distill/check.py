"""``distill data check``: open every image fully, find what would break or spoil training.

Rejected rows (written to ``rejected.jsonl`` with their reason): missing files, empty (0-byte)
files, corrupt or truncated images, images too small or too large to use, rows without a caption
in caption data. Reported but kept (``report.json`` notes): CMYK / palette / alpha / grey modes
(converted to RGB, alpha onto white), duplicate images by content hash, over-long captions
(more CLIP tokens than a 77-token context holds, counted with open_clip's tokenizer, or too many
characters or words). ``clean.jsonl`` lists the usable rows, ready for ``distill fit``, with image paths
relative to itself. Training and cache builds skip exactly the rows this check rejects.
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

from .data import MAX_PIXELS, MIN_SIDE, Rows, as_rows, image_problem
from .io import atomic_write_bytes, write_json

NOTE_MODES = {"CMYK": "CMYK image (converted to RGB)", "P": "palette image (converted to RGB)",
              "RGBA": "image with alpha (composited onto white)", "LA": "grey image with alpha (composited onto white)",
              "PA": "palette image with alpha (composited onto white)", "L": "greyscale image (converted to RGB)",
              "I;16": "16-bit image (scaled to 8 bits)", "I": "32-bit image (scaled to 8 bits)",
              "F": "floating-point image (scaled to 8 bits)"}
CONTEXT_TOKENS = 77  # CLIP's text context, start and end tokens included
MAX_CHARS = 300


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
    import io

    from PIL import Image

    from .data import image_source, read_errors, read_problem, stat_problem
    from .transforms import to_rgb

    problem = stat_problem(path)
    if problem:
        return ImageInfo(path, problem)
    try:
        src = image_source(path)
        if hasattr(src, "convert"):  # a decoded dataset image
            im, data = src, src.tobytes()
        else:
            with src:
                data = src.read()
            im = Image.open(io.BytesIO(data))
            im.load()  # raises on truncated data
        to_rgb(im)  # what training does next: a mode it cannot convert is rejected here too
        return ImageInfo(path, None, im.width, im.height, im.mode, hashlib.sha1(data).hexdigest())
    except read_errors() as e:
        return ImageInfo(path, read_problem(path, e))


@dataclass
class CheckReport:
    rows: int
    clean: int
    rejected: list[dict[str, Any]] = field(default_factory=list)
    notes: list[dict[str, Any]] = field(default_factory=list)
    layout: str = ""

    @property
    def counts(self) -> dict[str, int]:
        c = Counter(r["reason"].split(" (")[0] for r in self.rejected)
        c.update(n["problem"].split(" (")[0] for n in self.notes)
        return dict(c)

    def summary(self) -> str:
        lines = [f"layout: {self.layout}"] if self.layout else []
        lines += [f"{self.rows} rows: {self.clean} usable, {len(self.rejected)} rejected, {len(self.notes)} notes"]
        lines += [f"  {n:6d}  {what}" for what, n in sorted(self.counts.items(), key=lambda kv: -kv[1])]
        return "\n".join(lines)


def _token_counter():
    """CLIP BPE token counts (open_clip ships its vocabulary), or None when open_clip is missing."""
    try:
        from open_clip.tokenizer import SimpleTokenizer
    except ImportError:
        return None
    tok = SimpleTokenizer()
    return lambda text: len(tok.encode(text)) + 2  # + start and end tokens


def long_caption(caption: str, count_tokens=None, max_words: int = 60, max_chars: int = MAX_CHARS,
                 max_tokens: int = CONTEXT_TOKENS) -> str | None:
    """Why a caption is too long to be seen whole (None when it fits): tokens, characters or words;
    characters and tokens catch scripts without spaces (Chinese, Japanese, Thai)."""
    tokens = count_tokens(caption) if count_tokens else None
    if tokens is not None and tokens > max_tokens:
        return f"over-long caption ({tokens} CLIP tokens, over {max_tokens}; the tokenizer truncates it)"
    if len(caption) > max_chars:
        return f"over-long caption ({len(caption)} characters, over {max_chars}; the tokenizer truncates it)"
    if len(caption.split()) > max_words:
        return f"over-long caption ({len(caption.split())} words, over {max_words}; the tokenizer truncates it)"
    return None


def _relative(path: str | None, out: Path) -> str | None:
    """A local image path as seen from ``out`` (so clean.jsonl resolves wherever it is read from)."""
    if not path or "://" in path:
        return path
    return os.path.relpath(path, os.path.abspath(out))


def check_data(source: Any, out: str | os.PathLike | None = None, workers: int | None = None,
               min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS, max_words: int = 60,
               progress: bool = True, overwrite: bool = False) -> CheckReport:
    """Scan every row of ``source``; write ``clean.jsonl``, ``rejected.jsonl`` and ``report.json``
    into ``out`` when given (a new folder, or with ``overwrite`` one holding another clip-distill
    artifact; never one that holds the data). ``max_pixels`` is PIL's decompression-bomb limit."""
    from .outputs import claim, image_folders, inputs_of
    from .progress import progress as report

    rows: Rows = as_rows(source)
    if out is not None:
        claim(out, "a data check", inputs_of({"the data": source if isinstance(source, (str, os.PathLike)) else None,
                                              "an image folder of the data": image_folders(rows.images)}),
              overwrite=overwrite)
    paths = list(dict.fromkeys(p for p in rows.images if p))
    workers = workers or min(8, os.cpu_count() or 1)
    info: dict[str, ImageInfo] = {}
    if paths:
        with ProcessPoolExecutor(workers) as pool, report(len(paths), "check", "img",
                                                           enabled=progress) as bar:
            for i in pool.map(inspect_image, paths, chunksize=16):
                info[i.path] = i
                bar.update(1)
    notes, first_of = [], {}
    for p in paths:
        i = info[p]
        if i.error is None:
            i.error = image_problem(i.width, i.height, min_side, max_pixels)
        if i.error is not None:
            continue
        if i.mode in NOTE_MODES:
            notes.append({"image": p, "problem": NOTE_MODES[i.mode]})
        if i.sha in first_of:
            notes.append({"image": p, "problem": f"duplicate image (same bytes as {first_of[i.sha]})"})
        else:
            first_of[i.sha] = p
    pair_data = rows.has_text
    count_tokens = _token_counter() if pair_data else None
    clean, rejected = [], []
    for k, (p, c) in enumerate(zip(rows.images, rows.captions)):
        reason = info[p].error if p else None
        if reason is None and pair_data and not (c or "").strip():
            reason = "empty caption"
        if reason is None and not p and not (c or "").strip():
            reason = "neither image nor caption"
        if reason is None and not p and rows.has_images:  # training skips it too: its image side is missing
            reason = "no image"
        record = {"image": _relative(p, Path(out)) if out is not None else p, "caption": c}
        if rows.labels is not None:
            record["label"] = rows.classes[rows.labels[k]] if rows.classes else rows.labels[k]
        if reason is not None:
            rejected.append({**record, "reason": reason, "row": k, "where": rows.where(k)})
            continue
        long = long_caption(c, count_tokens, max_words) if c else None
        if long:
            notes.append({"image": p, "caption": c[:80], "row": k, "where": rows.where(k), "problem": long})
        clean.append(record)
    report = CheckReport(len(rows), len(clean), rejected, notes, rows.layout)
    if out is not None:
        from .outputs import staged

        dump = lambda recs: "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")  # noqa: E731
        with staged(out) as tmp:
            atomic_write_bytes(tmp / "clean.jsonl", dump(clean))
            atomic_write_bytes(tmp / "rejected.jsonl", dump(rejected))
            write_json(tmp / "report.json", {"source": rows.source, "layout": rows.layout, "rows": report.rows,
                                             "clean": report.clean, "rejected": len(rejected),
                                             "counts": report.counts, "notes": notes})
    return report
