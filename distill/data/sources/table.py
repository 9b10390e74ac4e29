"""Delimited text files: ``.csv`` / ``.tsv`` (or ``;`` / ``|`` separated) with a header naming an image and/or a
caption column, headerless ``<image file><sep><caption>`` lines (Flickr8k's ``name.jpg#0<TAB>caption`` too),
and ``.txt`` files of one caption per line (text-only)."""
from __future__ import annotations

import csv
import os
import re
from pathlib import Path

from ...errors import DataError
from ..images import IMAGE_EXTS
from ..rows import Rows
from .records import CAPTION_KEYS, IMAGE_KEYS, read_table, read_text_file, rows_from_records
from .registry import Source, register_source


# `0001.jpg<sep>caption` lines (Flickr8k's `name.jpg#0<TAB>caption` too): the name ends in an image extension
_NAMED_LINE = re.compile(
    r"^\s*(?P<name>.+?\.(?:" + "|".join(e[1:] for e in IMAGE_EXTS) + r"))(?:#\d+)?(?:\s*[\t|,;]\s*|\s+)(?P<caption>.*?)\s*$",
    re.IGNORECASE)
_DELIMITERS = (",", "\t", ";", "|")
LAYOUTS = ("a header row naming an image and/or caption column (csv, tsv, ; or | separated)",
           "headerless `<image file><sep><caption>` lines (sep: tab, comma, |, ; or spaces)",
           "one plain caption per line (.txt, text-only)")


def _header_fields(line: str, preferred: str) -> tuple[str, list[str]] | None:
    """(delimiter, fields) when ``line`` is a header naming an image or caption column."""
    for d in (preferred, *[d for d in _DELIMITERS if d != preferred]):
        fields = [f.strip().lower() for f in next(csv.reader([line], delimiter=d))]
        if any(f in IMAGE_KEYS or f in CAPTION_KEYS for f in fields):
            return d, fields
    return None


def read_lines_file(path: Path, text: str, suffix: str, image_column: str | None,
                     caption_column: str | None) -> tuple[list[dict], list[int], str]:
    """Records, their line numbers and the layout of a .csv / .tsv / .txt caption file (see LAYOUTS)."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DataError(f"{path}: the file is empty")
    preferred = "\t" if suffix == ".tsv" else ","
    header = _header_fields(lines[first], preferred)
    if header is None and (image_column or caption_column):
        header = preferred, [f.strip() for f in next(csv.reader([lines[first]], delimiter=preferred))]
    if header is not None:
        return read_table(path, text, header[0])
    named = [_NAMED_LINE.match(line) if line.strip() else None for line in lines]
    filled = [i for i, line in enumerate(lines) if line.strip()]
    matched = [i for i in filled if named[i]]
    if matched:
        odd = [i for i in filled if not named[i]]
        if odd:
            raise DataError(f"{path}:{odd[0] + 1}: this line does not start with an image file name, but "
                            f"{len(matched)} other lines do (e.g. line {matched[0] + 1}); accepted layouts: "
                            + "; ".join(LAYOUTS))
        records = [{"image": named[i]["name"].strip(), "caption": named[i]["caption"]} for i in matched]
        return records, [i + 1 for i in matched], "headerless `<image><sep><caption>` lines"
    if suffix == ".txt":
        return [{"caption": lines[i].strip()} for i in filled], [i + 1 for i in filled], \
            "one caption per line (text-only)"
    raise DataError(f"{path}:{first + 1}: no header naming an image column ({', '.join(IMAGE_KEYS[:4])}, ...) or a "
                    f"caption column ({', '.join(CAPTION_KEYS[:4])}, ...), and the lines do not start with image "
                    "file names; accepted layouts: " + "; ".join(LAYOUTS) +
                    ". Name the columns with data.image_column / data.caption_column.")


def read_table_file(path: str, image_column: str | None = None, caption_column: str | None = None) -> Rows:
    """Rows of a ``.csv``, ``.tsv`` or ``.txt`` file."""
    file = Path(os.path.expanduser(path))
    records, lines, layout = read_lines_file(file, read_text_file(file), file.suffix.lower(), image_column,
                                             caption_column)
    return rows_from_records(records, file.parent, str(file), image_column, caption_column, lines, layout)


register_source(Source("table", lambda s: Path(os.path.expanduser(s)).suffix.lower() in (".csv", ".tsv", ".txt")
                       and Path(os.path.expanduser(s)).is_file(), read_table_file))
