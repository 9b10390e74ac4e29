"""Webdataset-style ``.tar`` shards: members sharing a key (``dir/0001.jpg`` + ``dir/0001.txt``) form a sample;
one tar, a folder of them, or a glob. Images are addressed as ``<tar>::<member>``."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path
from typing import Any

from ...errors import DataError, first_line
from ..images import IMAGE_EXTS
from ..rows import Rows
from .records import CAPTION_KEYS
from .registry import Source, register_source


_TEXT_EXTS = (".txt", ".caption", ".cap")


def read_tars(tars: list[str], where: str) -> Rows:
    """webdataset layout: members sharing a key (``dir/0001.jpg`` + ``dir/0001.txt``) form a sample."""
    import tarfile

    if not tars:
        raise DataError(f"{where}: no .tar shards")
    images, captions = [], []
    for tar_path in tars:
        samples: dict[str, dict[str, Any]] = {}
        try:
            with tarfile.open(tar_path) as tar:
                for m in tar.getmembers():
                    if not m.isfile():
                        continue
                    key, ext = os.path.splitext(m.name)
                    ext = ext.lower()
                    if ext in IMAGE_EXTS:
                        samples.setdefault(key, {})["image"] = f"{os.path.abspath(tar_path)}::{m.name}"
                    elif ext in _TEXT_EXTS or ext == ".json":
                        raw = _member_caption(tar, m, ext, tar_path)
                        if raw is not None:
                            samples.setdefault(key, {}).setdefault("captions", [])
                            samples[key]["captions"] += raw if isinstance(raw, list) else [raw]
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataError(f"{tar_path}: not a readable tar file ({first_line(e)})") from None
        for key in sorted(samples):
            s = samples[key]
            for c in s.get("captions") or [None]:
                images.append(s.get("image"))
                captions.append(None if c is None else str(c).strip())
    return Rows(images, captions, source=where, layout=f"webdataset tar shards ({len(tars)})")


def _member_caption(tar, member, ext: str, tar_path: str):
    where = f"{tar_path}::{member.name}"
    try:
        raw = tar.extractfile(member).read().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{where}: not UTF-8 text") from None
    if ext != ".json":
        return raw
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
    return next((meta[k] for k in CAPTION_KEYS if k in meta), None) if isinstance(meta, dict) else None


def _read(source: str, image_column: str | None = None, caption_column: str | None = None) -> Rows:
    if any(ch in source for ch in "*?["):
        return read_tars(sorted(glob.glob(os.path.expanduser(source))), source)
    return read_tars([str(Path(os.path.expanduser(source)))], source)


register_source(Source("tar", lambda s: s.endswith(".tar") and (any(ch in s for ch in "*?[")
                                                               or os.path.isfile(os.path.expanduser(s))), _read))
