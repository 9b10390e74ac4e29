"""JSON sources: a ``.json`` list or ``.jsonl`` lines of ``{"image": ..., "caption": ...}`` (a caption may be a list)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...errors import DataError
from ..rows import Rows
from .records import read_text_file, rows_from_records
from .registry import Source, register_source


def read_jsonl(path: Path, text: str) -> tuple[list[dict], list[int]]:
    out, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            lines.append(n)
    return out, lines


def read_json_file(path: str, image_column: str | None = None, caption_column: str | None = None) -> Rows:
    """Rows of a ``.json`` list or a ``.jsonl`` file."""
    file = Path(os.path.expanduser(path))
    if file.suffix.lower() == ".jsonl":
        records, lines = read_jsonl(file, read_text_file(file))
        return rows_from_records(records, file.parent, str(file), image_column, caption_column, lines, "JSON lines")
    try:
        records = json.loads(read_text_file(file))
    except json.JSONDecodeError as e:
        raise DataError(f"{file}:{e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{file}: expected a JSON list of objects")
    return rows_from_records(records, file.parent, str(file), image_column, caption_column, None, "a JSON list")


register_source(Source("json", lambda s: Path(os.path.expanduser(s)).suffix.lower() in (".json", ".jsonl")
                       and Path(os.path.expanduser(s)).is_file(), read_json_file))
