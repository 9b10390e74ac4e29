"""Where rows come from: one reader per kind of source behind one registry (``SOURCES``), as timm's
``data/readers``. ``load_rows`` asks each reader whether it reads the source. A new source is one module
that calls ``register_source(Source(...))``, imported below.

Kinds: ``.csv`` / ``.tsv`` / ``.txt`` (``table``), ``.json`` / ``.jsonl`` (``json``), folders (``folder``: a
metadata file, class subfolders, plain images, tar shards), webdataset ``.tar`` shards and globs (``tar``),
``hf:<dataset>[@split]`` (``hf``). Parallel sentences are read by ``load_parallel`` (``data.parallel_source``).
Relative image paths resolve against the folder of the file that names them, or an ``images/`` folder beside it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...errors import DataError, DataNotFoundError
from ..rows import Rows
from . import folder, hf, json_files, table, tar  # noqa: F401  (register the readers)
from .parallel import load_parallel, pair_by_image, write_parallel
from .records import CAPTION_KEYS, IMAGE_FOLDERS, IMAGE_KEYS, LABEL_KEYS, read_table, read_text_file
from .registry import SOURCES, Source, register_source
from .table import LAYOUTS


def load_rows(source: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None) -> Rows:
    """Read image-caption rows from a file, folder, tar shards or dataset (see the module docstring)."""
    text = str(source)
    for name in SOURCES.list():
        reader = SOURCES.create(name)
        if reader.match(text):
            return reader.read(text, image_column, caption_column)
    path = Path(os.path.expanduser(text))
    if not path.exists():
        raise DataNotFoundError(f"data source {text!r} does not exist")
    raise DataError(f"{path}: unsupported data file (use .csv, .tsv, .json, .jsonl, .txt, .tar or a folder)")


def as_rows(data: Any, **kwargs: Any) -> Rows:
    """``data`` as Rows: Rows as they are, anything else through ``load_rows``."""
    return data if isinstance(data, Rows) else load_rows(data, **kwargs)


def photo_paths(source: Any) -> list[str]:
    """The photos of ``source``: a folder (searched recursively, hidden folders skipped), or any data source
    ``load_rows`` reads (its distinct images, in order)."""
    from ..images import IMAGE_EXTS
    from .folder import image_files

    if isinstance(source, (str, os.PathLike)) and os.path.isdir(os.path.expanduser(str(source))):
        folder = Path(os.path.abspath(os.path.expanduser(str(source))))
        if not (folder / "metadata.jsonl").exists() and not (folder / "metadata.csv").exists():
            files = image_files(folder)
            if not files:
                raise DataError(f"{folder}: no photos in it or its subfolders ({', '.join(IMAGE_EXTS)})")
            return files
    rows = load_rows(source) if isinstance(source, (str, os.PathLike)) else source
    if not rows.has_images:
        raise DataError(f"{getattr(rows, 'source', source)}: it has no images")
    return list(dict.fromkeys(p for p in rows.images if p))


__all__ = ["load_rows", "as_rows", "photo_paths", "load_parallel", "pair_by_image", "write_parallel", "SOURCES", "Source", "register_source", "read_table", "read_text_file",
           "IMAGE_KEYS", "CAPTION_KEYS", "LABEL_KEYS", "IMAGE_FOLDERS", "LAYOUTS"]
