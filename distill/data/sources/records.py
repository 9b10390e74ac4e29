"""From records (parsed rows of a table or JSON file) to Rows: column names, relative paths, labels."""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Sequence

from ...errors import DataError
from ..rows import Rows

IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img", "image_name",
              "image_file", "img_path")
CAPTION_KEYS = ("caption", "text", "captions", "sentence", "title", "prompt", "comment", "description")
LABEL_KEYS = ("label", "class", "class_name", "category")
IMAGE_FOLDERS = ("images", "Images", "imgs", "img")  # looked into when a file's relative paths miss beside it


def pick_column(keys: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise DataError(f"{where}: no {what} column {wanted!r}; columns are {list(keys)}")
        return wanted
    lower = {str(k).lower().strip(): k for k in keys}
    return next((lower[c] for c in candidates if c in lower), None)


def resolve_path(path: str, base: Path) -> str:
    """Absolute path of a data entry (relative ones against ``base``); URLs, tar members and dataset rows
    are kept. Symlinks are not resolved here: the cache keys images by content, not by path."""
    if "://" in path:
        return path
    p = Path(os.path.expanduser(path))
    return os.path.abspath(p if p.is_absolute() else base / p)


def image_base(names: Sequence[str], folder: Path) -> tuple[Path, str]:
    """Where relative image names live: beside the file that lists them, else an ``images/`` folder
    beside it when that is where a sample of them exists."""
    sample = [n for n in names if n and "://" not in n and not os.path.isabs(os.path.expanduser(n))][:50]
    if not sample:
        return folder, ""

    def hits(base: Path) -> int:
        return sum(os.path.exists(base / n.split("::")[0]) for n in sample)

    here = hits(folder)
    if here == len(sample):
        return folder, ""
    for sub in IMAGE_FOLDERS:
        if (folder / sub).is_dir() and hits(folder / sub) > here:
            return folder / sub, f"; images found in {sub}/ beside the file"
    return folder, ""


def read_text_file(path: str | os.PathLike) -> str:
    """A file's text as UTF-8 (a BOM is dropped); a file that is not UTF-8 fails naming the line."""
    path = Path(path)
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at column {col}); save the file as "
                        "UTF-8 (e.g. iconv -f latin1 -t utf-8)") from None


def rows_from_records(records: list, base: Path, where: str, image_key: str | None, caption_key: str | None,
                  lines: list[int] | None = None, layout: str = "") -> Rows:
    """Rows of parsed records; ``lines`` locate them in the file (None: items of a JSON list, counted from 1)."""
    unit = "line" if lines is not None else "item"
    at = (lambda n: f"{where}:{lines[n]}") if lines is not None else (lambda n: f"{where} item {n + 1}")  # noqa: E731
    if not records:
        raise DataError(f"{where}: no rows (an empty list)")
    bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
    if bad is not None:
        raise DataError(f"{at(bad)}: expected an object with image/caption keys, got {type(records[bad]).__name__}")
    keys = list({k: None for r in records for k in r if k is not None})
    ik = pick_column(keys, image_key, IMAGE_KEYS, "image", where)
    ck = pick_column(keys, caption_key, CAPTION_KEYS, "caption", where)
    if ik is None and ck is None:
        raise DataError(f"{where}: found neither an image column {IMAGE_KEYS} nor a caption column {CAPTION_KEYS}; "
                        f"columns are {keys}; name them with data.image_column / data.caption_column")
    lk = pick_column(keys, None, LABEL_KEYS, "label", where)
    names = [str(r.get(ik)).strip() for r in records if ik and r.get(ik) not in (None, "")]
    base, found = image_base(names, base)
    images, captions, raw_labels, out_lines = [], [], [], []
    for n, r in enumerate(records):
        img = r.get(ik) if ik else None
        if isinstance(img, (dict, list)):
            raise DataError(f"{at(n)}: the image value must be a path, got {img!r}"[:300])
        img = resolve_path(str(img).strip(), base) if img not in (None, "") and str(img).strip() else None
        caps = r.get(ck) if ck else None
        caps = caps if isinstance(caps, list) else [caps]
        for c in caps or [None]:  # an empty list is a row without a caption: reported, not dropped
            if isinstance(c, (dict, list)):
                raise DataError(f"{at(n)}: a caption must be text, got {c!r}"[:300])
            images.append(img)
            captions.append(None if c is None else str(c).strip())
            raw_labels.append(r.get(lk) if lk else None)
            out_lines.append(lines[n] if lines is not None else n + 1)
    rows = Rows(images, captions, source=where, lines=out_lines, layout=(layout + found).strip("; "), unit=unit)
    if lk and all(v not in (None, "") for v in raw_labels):
        rows.labels, rows.classes = labels_of(raw_labels, base)
    return rows


def labels_of(raw: list, base: Path) -> tuple[list[int], list[str]]:
    """Class indices and names: integer labels take their names from a ``classes.csv`` (label,name)
    beside the file when there is one; otherwise the label values are the class names."""
    names_file = base / "classes.csv"
    if all(str(v).strip().isdigit() for v in raw) and names_file.exists():
        records, _, _ = read_table(names_file, read_text_file(names_file), ",")
        try:
            table = {int(r["label"]): r["name"] for r in records}
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{names_file}: expected columns label,name with integer labels") from None
        missing = sorted({int(v) for v in raw} - set(table))
        if missing:
            raise DataError(f"{names_file}: no name for label {missing[0]}")
        classes = [table[i] for i in sorted(table)]
        index = {k: i for i, k in enumerate(sorted(table))}
        return [index[int(v)] for v in raw], classes
    classes = sorted({str(v) for v in raw})
    index = {c: i for i, c in enumerate(classes)}
    return [index[str(v)] for v in raw], classes


def read_table(path: Path, text: str, delimiter: str) -> tuple[list[dict], list[int], str]:
    """Rows of a delimited file with a header. A row with more fields than the header keeps the extra
    ones in its last column when that is the caption (unquoted commas in a caption), else fails. A quote
    that is never closed (it would swallow the lines after it into one caption) fails naming its line."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
        while not any(f.strip() for f in header):
            header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: the file is empty") from None
    header = [f.strip() for f in header]
    seen = {}
    for j, name in enumerate(header):
        if name and name.lower() in seen:
            raise DataError(f"{path}:{reader.line_num}: the column {name!r} appears twice in the header "
                            f"(columns {seen[name.lower()] + 1} and {j + 1}); rename one")
        seen[name.lower()] = j
    last_is_caption = header[-1].lower() in CAPTION_KEYS
    records, lines = [], []
    start = reader.line_num + 1
    try:
        for row in reader:
            if any("\n" in f for f in row):
                _check_quotes(path, row, start, len(header), delimiter)
            if not any(f.strip() for f in row):
                start = reader.line_num + 1
                continue
            if len(row) > len(header):
                if not last_is_caption:
                    raise DataError(f"{path}:{reader.line_num}: {len(row)} fields but the header has {len(header)}; "
                                    f"quote fields that contain {delimiter!r}")
                row = row[:len(header) - 1] + [delimiter.join(row[len(header) - 1:])]
            records.append({k: (row[j] if j < len(row) else None) for j, k in enumerate(header)})
            lines.append(start)
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: {e}") from None
    if not records:
        raise DataError(f"{path}: no rows, only a header ({', '.join(header)})")
    name = {",": "comma", "\t": "tab", ";": "semicolon", "|": "|"}[delimiter]
    return records, lines, f"{name}-separated with a header ({', '.join(header)})"


def _check_quotes(path: Path, row: list[str], start: int, width: int, delimiter: str) -> None:
    """A field that runs over lines which are whole rows themselves is an unclosed quote, not a caption."""
    for value in row:
        inner = value.split("\n")[1:]
        whole = [x for x in inner if x.strip() and len(next(csv.reader([x], delimiter=delimiter))) == width]
        if whole:
            raise DataError(f"{path}:{start}: a quote opened on this line is not closed, so the {len(inner)} lines "
                            f"after it were read into one field (e.g. {whole[0][:60]!r}); close or remove the quote")
