"""Folders: a ``metadata.jsonl`` / ``metadata.csv`` beside the images, class subfolders (captions "a photo of
a {class}."), a plain folder of images (image-only), or a folder of webdataset ``.tar`` shards."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from ...errors import DataError
from ..images import IMAGE_EXTS
from ..rows import Rows
from .json_files import read_json_file
from .records import read_table, read_text_file
from .registry import Source, register_source
from .table import read_table_file
from .tar import read_tars

log = logging.getLogger(__name__)


def folder_class_names(path: Path) -> dict[str, str]:
    """Class names of class folders from a ``classes.csv`` (folder,class) in the folder or beside it."""
    for f in (path / "classes.csv", path.parent / "classes.csv"):
        if f.is_file():
            records, _, _ = read_table(f, read_text_file(f), ",")
            keys = {k.lower(): k for k in (records[0] if records else {})}
            fk, nk = keys.get("folder") or keys.get("label"), keys.get("class") or keys.get("name")
            if fk and nk:
                return {str(r[fk]).strip(): str(r[nk]).strip() for r in records if r.get(fk)}
    return {}


def image_files(path: Path) -> list[str]:
    """Every image file under ``path``, its subfolders included (hidden files and folders skipped), sorted."""
    out = []
    for root, dirs, files in os.walk(path, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [os.path.join(root, f) for f in sorted(files)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTS]
    return out


def read_folder(path: Path, image_column: str | None, caption_column: str | None) -> Rows:
    if (path / "metadata.jsonl").exists():
        return read_json_file(str(path / "metadata.jsonl"), image_column, caption_column)
    if (path / "metadata.csv").exists():
        return read_table_file(str(path / "metadata.csv"), image_column, caption_column)
    entries = sorted(path.iterdir())
    tars = [str(f) for f in entries if f.suffix.lower() == ".tar" and f.is_file()]
    files = [str(f) for f in entries if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
    if tars and not files:
        return read_tars(tars, str(path))
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    classes = [(d, sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())) for d in subdirs]
    classes = [(d, fs) for d, fs in classes if fs]
    if classes and not files:  # class folders
        names = folder_class_names(path)
        images, captions, labels = [], [], []
        for label, (d, fs) in enumerate(classes):
            name = names.get(d.name, d.name.replace("_", " "))
            images += [str(f) for f in fs]
            captions += [f"a photo of a {name}."] * len(fs)
            labels += [label] * len(fs)
        empty = [d.name for d in subdirs if d not in {c for c, _ in classes}]
        if empty:
            log.warning("%s: %d subfolders hold no images and are not classes: %s", path, len(empty), ", ".join(empty[:5]))
        return Rows(images, captions, labels, [names.get(d.name, d.name.replace("_", " ")) for d, _ in classes],
                    source=str(path), layout=f"class folders ({len(classes)} classes)")
    if files:
        return Rows(files, [None] * len(files), source=str(path), layout="a folder of images (image-only)")
    nested = [d.name for d in subdirs if any(x.is_dir() for x in d.iterdir())]
    hint = f"; it has folders of folders: point at one of them (e.g. {path / nested[0]})" if nested else ""
    what = f"its subfolders ({', '.join(d.name for d in subdirs[:5])}) hold no images" if subdirs else "it is empty"
    raise DataError(f"{path}: no images ({', '.join(IMAGE_EXTS)}), no metadata.jsonl/csv and no .tar shards: "
                    f"{what}{hint}")


register_source(Source("folder", lambda s: os.path.isdir(os.path.expanduser(s)),
                       lambda s, image_column, caption_column: read_folder(Path(os.path.expanduser(s)), image_column,
                                                                           caption_column)))
