"""Image-text data: read rows from csv/tsv/json/jsonl files or folders, and a Dataset
that serves replayable views of each image for the teacher and the student.

Row sources:
  * ``.csv`` / ``.tsv`` with an image column and a caption column (names auto-detected);
  * ``.json`` (a list) and ``.jsonl`` of ``{"image": ..., "caption": ...}``; a caption may be a list;
  * a folder with ``metadata.jsonl`` / ``metadata.csv``; a folder of class subfolders
    (captions "a photo of a {class}."); or a plain folder of images (image-only);
  * a file with only a caption column (text-only), or a ``.txt`` file of one caption per line;
  * webdataset-style ``.tar`` shards (``key.jpg`` + ``key.txt``/``.caption``/``.json``): one tar,
    a folder of them, or a glob;
  * ``hf:<local dataset dir or hub name>[@split]``: a Hugging Face ``datasets`` dataset, with its
    image and text columns auto-detected or named (``image_column`` / ``caption_column``).
Relative image paths resolve against the folder of the file that names them. Images inside a tar
or a dataset are addressed as ``<tar>::<member>`` / ``hf://<source>@<split>#<column>/<row>``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import DataError, DataNotFoundError, first_line
from .transforms import PreprocessCfg, View, crop_uint8, eval_view, random_view, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img", "image_name",
              "image_file", "img_path")
CAPTION_KEYS = ("caption", "text", "captions", "sentence", "title", "prompt", "comment", "description")
LABEL_KEYS = ("label", "class", "class_name", "category")
IMAGE_FOLDERS = ("images", "Images", "imgs", "img")  # looked into when a file's relative paths miss beside it

# The rules `distill data check` rejects images by, and training and cache builds skip them by.
MIN_SIDE = 16  # pixels: smaller images carry no usable content at any student size
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit


@dataclass
class Rows:
    """Flat image-caption pairs (one row per caption); ``labels``/``classes`` for class folders.

    ``lines``: where each row came from in ``source`` (1-based line of a text file), for messages;
    ``layout``: how the source was read (``distill data check`` reports it)."""

    images: list[str | None]
    captions: list[str | None]
    labels: list[int] | None = None
    classes: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    lines: list[int] | None = None
    layout: str = ""
    unit: str = "line"  # what ``lines`` count: "line" of a text file, or "item" of a JSON list
    teacher_texts: list[str | None] | None = None  # what the teacher reads for each row, when not its caption

    def teacher_text(self, i: int) -> str | None:
        return self.teacher_texts[i] if self.teacher_texts is not None else self.captions[i]

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_images(self) -> bool:
        return any(i is not None for i in self.images)

    @property
    def has_text(self) -> bool:
        return any(c for c in self.captions)

    def where(self, i: int) -> str:
        """``pairs.csv:58`` (or ``pairs.csv row 57``) for messages about row ``i``."""
        if self.lines is not None and self.lines[i]:
            return f"{self.source}:{self.lines[i]}" if self.unit == "line" else f"{self.source} item {self.lines[i]}"
        return f"{self.source or '<rows>'} row {i}"

    def subset(self, idx: Sequence[int]) -> "Rows":
        return Rows(
            [self.images[i] for i in idx], [self.captions[i] for i in idx],
            [self.labels[i] for i in idx] if self.labels is not None else None, self.classes, self.source,
            dict(self.extra), [self.lines[i] for i in idx] if self.lines is not None else None, self.layout,
            self.unit, [self.teacher_texts[i] for i in idx] if self.teacher_texts is not None else None,
        )


def image_problem(width: int, height: int, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of this size is not used (None when it is fine): one rule for check, fit and cache."""
    if min(width, height) < min_side:
        return f"image too small ({width}x{height}, under {min_side} px)"
    if width * height > max_pixels:
        return f"image too large ({width}x{height}, over {max_pixels} pixels)"
    return None


def _pick(keys: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise DataError(f"{where}: no {what} column {wanted!r}; columns are {list(keys)}")
        return wanted
    lower = {str(k).lower().strip(): k for k in keys}
    return next((lower[c] for c in candidates if c in lower), None)


def _resolve(path: str, base: Path) -> str:
    """Absolute path of a data entry (relative ones against ``base``); URLs, tar members and dataset rows
    are kept. Symlinks are not resolved here: the cache keys images by content, not by path."""
    if "://" in path:
        return path
    p = Path(os.path.expanduser(path))
    return os.path.abspath(p if p.is_absolute() else base / p)


def _image_base(names: Sequence[str], folder: Path) -> tuple[Path, str]:
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


def _read_lines_file(path: Path, text: str, suffix: str, image_column: str | None,
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
        return _read_table(path, text, header[0])
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


def _read_table(path: Path, text: str, delimiter: str) -> tuple[list[dict], list[int], str]:
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


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], list[int]]:
    out, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            lines.append(n)
    return out, lines


def _from_records(records: list, base: Path, where: str, image_key: str | None, caption_key: str | None,
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
    ik = _pick(keys, image_key, IMAGE_KEYS, "image", where)
    ck = _pick(keys, caption_key, CAPTION_KEYS, "caption", where)
    if ik is None and ck is None:
        raise DataError(f"{where}: found neither an image column {IMAGE_KEYS} nor a caption column {CAPTION_KEYS}; "
                        f"columns are {keys}; name them with data.image_column / data.caption_column")
    lk = _pick(keys, None, LABEL_KEYS, "label", where)
    names = [str(r.get(ik)).strip() for r in records if ik and r.get(ik) not in (None, "")]
    base, found = _image_base(names, base)
    images, captions, raw_labels, out_lines = [], [], [], []
    for n, r in enumerate(records):
        img = r.get(ik) if ik else None
        if isinstance(img, (dict, list)):
            raise DataError(f"{at(n)}: the image value must be a path, got {img!r}"[:300])
        img = _resolve(str(img).strip(), base) if img not in (None, "") and str(img).strip() else None
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
        rows.labels, rows.classes = _labels(raw_labels, base)
    return rows


def _labels(raw: list, base: Path) -> tuple[list[int], list[str]]:
    """Class indices and names: integer labels take their names from a ``classes.csv`` (label,name)
    beside the file when there is one; otherwise the label values are the class names."""
    names_file = base / "classes.csv"
    if all(str(v).strip().isdigit() for v in raw) and names_file.exists():
        records, _, _ = _read_table(names_file, read_text_file(names_file), ",")
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


def load_rows(source: str | os.PathLike, image_column: str | None = None, caption_column: str | None = None) -> Rows:
    """Read image-caption rows from a file or folder (see the module docstring for formats)."""
    if str(source).startswith("hf:"):
        return _load_hf(str(source)[3:], image_column, caption_column)
    if any(ch in str(source) for ch in "*?[") and str(source).endswith(".tar"):
        import glob

        return _load_tars(sorted(glob.glob(os.path.expanduser(str(source)))), str(source))
    path = Path(os.path.expanduser(str(source)))
    if path.suffix.lower() == ".tar" and path.is_file():
        return _load_tars([str(path)], str(path))
    if not path.exists():
        raise DataNotFoundError(f"data source {str(source)!r} does not exist")
    if path.is_dir():
        return _load_folder(path, image_column, caption_column)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        records, lines, layout = _read_lines_file(path, read_text_file(path), suffix, image_column, caption_column)
    elif suffix == ".jsonl":
        records, lines = _read_jsonl(path, read_text_file(path))
        layout = "JSON lines"
    elif suffix == ".json":
        try:
            records = json.loads(read_text_file(path))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of objects")
        lines, layout = None, "a JSON list"
    else:
        raise DataError(f"{path}: unsupported data file (use .csv, .tsv, .json, .jsonl, .txt, .tar or a folder)")
    return _from_records(records, path.parent, str(path), image_column, caption_column, lines, layout)


def _folder_names(path: Path) -> dict[str, str]:
    """Class names of class folders from a ``classes.csv`` (folder,class) in the folder or beside it."""
    for f in (path / "classes.csv", path.parent / "classes.csv"):
        if f.is_file():
            records, _, _ = _read_table(f, read_text_file(f), ",")
            keys = {k.lower(): k for k in (records[0] if records else {})}
            fk, nk = keys.get("folder") or keys.get("label"), keys.get("class") or keys.get("name")
            if fk and nk:
                return {str(r[fk]).strip(): str(r[nk]).strip() for r in records if r.get(fk)}
    return {}


def load_parallel(source: str | os.PathLike, teacher_column: str, student_columns: Sequence[str] = (),
                  keep_source: bool = True) -> Rows:
    """Parallel sentences (a csv/tsv with one column per language, e.g. ``en,de,fr``) as rows whose caption
    is what the student reads and whose ``teacher_texts`` is what the teacher reads: one row per sentence
    of each student column, learnt onto the teacher's embedding of the ``teacher_column`` sentence (and,
    with ``keep_source``, the source sentence onto itself, so the student keeps that language).

    ``student_columns`` empty: every other column whose header is a language code (``de``, ``zh-cn``,
    ``pt_BR``) and whose values are sentences; other columns (ids, paths, scores) are never trained on.
    Every column used must hold sentences: file paths, URLs or numbers stop with the column named."""
    path = Path(os.path.expanduser(str(source)))
    if not path.is_file():
        raise DataNotFoundError(f"data.train: parallel sentences {str(source)!r}: no such file")
    records, lines, _ = _read_table(path, read_text_file(path), "\t" if path.suffix.lower() == ".tsv" else ",")
    columns = list(records[0])
    if teacher_column not in columns:
        raise DataError(f"{path}: no column {teacher_column!r} (data.parallel_source); columns are {columns}")
    values = {c: [(r.get(c) or "").strip() for r in records] for c in columns}
    if student_columns:
        targets = list(student_columns)
        missing = [c for c in targets if c not in columns]
        if missing:
            raise DataError(f"{path}: no column {missing[0]!r} (data.parallel_targets); columns are {columns}")
    else:
        targets = [c for c in columns if c != teacher_column and _LANGUAGE.match(c) and not _not_sentences(values[c])
                   and _wordy(values[c])]
        if not targets:
            raise DataError(f"{path}: no column besides {teacher_column!r} is a language of sentences (a header such "
                            f"as de, fr or zh-cn); columns are {columns}: name the ones the student learns in "
                            "data.parallel_targets")
        left = [c for c in columns if c != teacher_column and c not in targets]
        if left:
            log.info("%s: learning %s onto %s; not trained on: %s (name data.parallel_targets to choose)", path,
                     ", ".join(targets), teacher_column, ", ".join(left))
    for col, key in [(teacher_column, "data.parallel_source"), *((c, "data.parallel_targets") for c in targets)]:
        why = _not_sentences(values[col])
        if why:
            raise DataError(f"{path}: column {col!r} ({key}) holds {why}, not sentences; name the columns of "
                            f"sentences (columns are {columns})")
    learn = targets + ([teacher_column] if keep_source and teacher_column not in targets else [])
    captions, teacher, out_lines = [], [], []
    for k, line in enumerate(lines):
        src = values[teacher_column][k] or None
        for col in learn:
            captions.append(values[col][k] or None)
            teacher.append(src)
            out_lines.append(line)
    return Rows([None] * len(captions), captions, source=str(path), lines=out_lines, teacher_texts=teacher,
                layout=f"parallel sentences ({teacher_column} -> {', '.join(learn)})")


# a language tag as a column header: ISO 639 code, optionally a region or script (de, zh-cn, pt_BR, zh-Hant)
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$", re.IGNORECASE)


def _wordy(values: Sequence[str]) -> bool:
    """Most values are several words (spaces), or in a script written without spaces (Thai, CJK...): ids and
    one-word codes are not."""
    filled = [v for v in values if v]
    return sum(" " in v or any(ord(ch) >= 0x0E00 for ch in v) for v in filled) > len(filled) / 2


def _not_sentences(values: Sequence[str]) -> str | None:
    """What a column holds when it is not sentences (file paths, URLs, numbers or codes), else None."""
    filled = [v for v in values if v]
    if not filled:
        return "nothing (every row is empty)"
    n = len(filled)
    if sum("://" in v for v in filled) > n / 2:
        return "URLs"
    if sum(v.lower().endswith(IMAGE_EXTS) or ("/" in v and " " not in v) for v in filled) > n / 2:
        return "file paths"
    if sum(not any(ch.isalpha() for ch in v) for v in filled) > n / 2:
        return "numbers or codes"
    return None


def _load_folder(path: Path, image_column: str | None, caption_column: str | None) -> Rows:
    for meta in ("metadata.jsonl", "metadata.csv"):
        if (path / meta).exists():
            return load_rows(path / meta, image_column, caption_column)
    entries = sorted(path.iterdir())
    tars = [str(f) for f in entries if f.suffix.lower() == ".tar" and f.is_file()]
    files = [str(f) for f in entries if f.suffix.lower() in IMAGE_EXTS and f.is_file()]
    if tars and not files:
        return _load_tars(tars, str(path))
    subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
    classes = [(d, sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_EXTS and f.is_file())) for d in subdirs]
    classes = [(d, fs) for d, fs in classes if fs]
    if classes and not files:  # class folders
        names = _folder_names(path)
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


_TEXT_EXTS = (".txt", ".caption", ".cap")


def _load_tars(tars: list[str], where: str) -> Rows:
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


def _load_hf(spec: str, image_column: str | None, caption_column: str | None) -> Rows:
    """``hf:<dir or hub name>[@split]``: a Hugging Face dataset (needs ``pip install datasets``)."""
    from ._imports import require

    require("datasets", "Hugging Face datasets as a data source")
    source, _, split = spec.partition("@")
    ds = _hf_dataset(source, split or "train")
    cols = list(ds.column_names)
    ik = _pick(cols, image_column, IMAGE_KEYS, "image", f"hf:{spec}")
    ck = _pick(cols, caption_column, CAPTION_KEYS, "caption", f"hf:{spec}")
    if ik is None and ck is None:
        raise DataError(f"hf:{spec}: found neither an image column nor a caption column; columns are {cols}; "
                        "name them with data.image_column / data.caption_column")
    caps = ds[ck] if ck else [None] * len(ds)
    images, captions = [], []
    for i, c in enumerate(caps):
        for one in (c if isinstance(c, list) else [c]):
            images.append(f"hf://{source}@{split or 'train'}#{ik}/{i}" if ik else None)
            captions.append(None if one is None else str(one).strip())
    return Rows(images, captions, source=f"hf:{spec}", layout="a Hugging Face dataset")


_HF_CACHE: dict[tuple[str, str], Any] = {}


def _hf_dataset(source: str, split: str):
    key = (source, split)
    if key not in _HF_CACHE:
        import datasets

        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
            ds = ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            ds = datasets.load_dataset(source, split=split)
        _HF_CACHE[key] = ds
    return _HF_CACHE[key]


_TARS: dict[str, Any] = {}  # open tar handles, one per process (DataLoader workers open their own)


def _image_bytes(path: str):
    """A file-like object for a tar member or a dataset row image; None for a plain path."""
    import io

    if path.startswith("hf://"):
        source, _, rest = path[5:].rpartition("@")
        split, _, col_row = rest.partition("#")
        col, _, row = col_row.rpartition("/")
        value = _hf_dataset(source, split)[int(row)][col]
        if hasattr(value, "convert"):  # datasets.Image decodes to PIL already
            return value
        if isinstance(value, dict):
            value = value.get("bytes") or open(value["path"], "rb").read()
        return io.BytesIO(value)
    if "::" in path:
        import tarfile

        tar_path, member = path.split("::", 1)
        if tar_path not in _TARS or _TARS[tar_path][0] != os.getpid():
            _TARS[tar_path] = (os.getpid(), tarfile.open(tar_path))
        f = _TARS[tar_path][1].extractfile(member)
        if f is None:
            raise FileNotFoundError(f"{path}: no such member")
        return io.BytesIO(f.read())
    return None


def as_rows(data: Any, **kwargs: Any) -> Rows:
    return data if isinstance(data, Rows) else load_rows(data, **kwargs)


def open_image(path: str):
    """Open and fully decode an image (raises on missing/corrupt files); RGB, alpha on white."""
    from PIL import Image

    src = _image_bytes(path) if ("::" in path or path.startswith("hf://")) else None
    if src is None and os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file")  # a pipe would block the reader
    if src is not None and hasattr(src, "convert"):
        src.load()
        return to_rgb(src)
    with Image.open(src if src is not None else path) as im:
        im.load()
        return to_rgb(im)


def read_problem(path: str, error: BaseException) -> str:
    """Why an image could not be read, worded as ``distill data check`` words it."""
    plain = "::" not in path and not path.startswith("hf://")
    if plain and not os.path.exists(path):
        return "missing file"
    if plain and not os.path.isfile(path):
        return "not a regular file"
    if plain and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    return f"corrupt or truncated image ({type(error).__name__}: {str(error)[:120]})"


class RawImages:
    """Decodes the original files: ``open(path) -> (RGB PIL image, (width, height))``."""

    def open(self, path: str):
        image = open_image(path)
        return image, image.size


def usable_image(path: str, reader: Any = None) -> str | None:
    """Why the image at ``path`` is not used (None when it is): decoded once, checked by size."""
    try:
        _, size = (reader or RawImages()).open(path)
    except Exception as e:
        return read_problem(path, e)
    return image_problem(*size)


def split_usable(rows: Rows, need_image: bool, need_caption: bool) -> tuple[list[int], dict[int, str]]:
    """(rows a run can use, {row: why not} for the others), by the rules of ``distill data check`` that
    need no decoding: a missing or empty image file, no image where the run needs one, an empty
    caption in caption data. Problems that show only when decoding are skipped as rows are read."""
    skipped: dict[int, str] = {}
    problems: dict[str, str | None] = {}
    for i, (p, c) in enumerate(zip(rows.images, rows.captions)):
        if need_image and p is None:
            skipped[i] = "no image"
        elif need_caption and not (c or "").strip():
            skipped[i] = "empty caption"
        elif rows.teacher_texts is not None and not (rows.teacher_texts[i] or "").strip():
            skipped[i] = "empty source sentence"
        elif p is not None and need_image:
            if p not in problems:
                problems[p] = _stat_problem(p)
            if problems[p]:
                skipped[i] = problems[p]
    return [i for i in range(len(rows)) if i not in skipped], skipped


def _stat_problem(path: str) -> str | None:
    import stat

    if "::" in path or path.startswith("hf://"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return "missing file"
    if not stat.S_ISREG(st.st_mode):  # a folder, a pipe, a device: reading could block or fail
        return "not a regular file"
    return "empty file (0 bytes)" if st.st_size == 0 else None


class SkipLog:
    """Rows a run leaves out: one warning per row (however often it comes round), one line each in
    ``skipped.jsonl`` beside the run (appended as they come: nothing is lost on a crash), and a summary."""

    def __init__(self, path: str | os.PathLike | None = None, write: bool = True, resume: bool = False):
        self.path = Path(path) if path is not None else None
        self.write = write and self.path is not None
        self.seen: set[str] = set()
        self.reasons: dict[str, int] = {}
        if self.path is not None and self.path.exists():
            if resume:  # rows reported before the restart are not reported again
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    self._count(rec.get("where", ""), rec.get("reason", ""))
            elif self.write:
                self.path.unlink()

    def _count(self, where: str, reason: str) -> None:
        self.seen.add(where)
        key = reason.split(" (")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1

    def add(self, rows: Rows, i: int, reason: str) -> None:
        where = rows.where(i)
        if where in self.seen:
            return
        self._count(where, reason)
        log.warning("skipping %s: %s (%s)", where, reason, rows.images[i] or repr(rows.captions[i]))
        if self.write:
            rec = {"where": where, "image": rows.images[i], "caption": rows.captions[i], "reason": reason}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def add_all(self, rows: Rows, skipped: dict[int, str]) -> None:
        for i, reason in skipped.items():
            self.add(rows, i, reason)

    @property
    def count(self) -> int:
        return len(self.seen)

    def summary(self) -> str:
        if not self.seen:
            return ""
        parts = ", ".join(f"{n} {why}" for why, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
        where = f" (listed in {self.path})" if self.path is not None and self.write else ""
        return f"{len(self.seen)} rows skipped: {parts}{where}"


class PairDataset(torch.utils.data.Dataset):
    """Serves rows as ``{"index", "caption", "views": {key: uint8 [3, S, S]}}``.

    ``views`` maps a key ("student", "teacher") to a PreprocessCfg; each key receives the
    *same* crop of the image at its own size (its normalisation is applied on the device, by the
    step module, with ``transforms.normalize``). The crop for item ``i`` in
    epoch ``e`` depends only on (seed, e, i), so a resumed run replays identical crops.
    Sampler indices encode the epoch: ``epoch * len(rows) + i``. A row whose image cannot be used
    comes back as ``{"index", "skip": reason}`` (the rules of ``distill data check``).
    """

    def __init__(
        self,
        rows: Rows,
        views: dict[str, PreprocessCfg],
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        seed: int = 0,
        reader: Any = None,
        flip: bool = False,
    ):
        self.rows = rows
        self.reader = reader or RawImages()  # or a PackedImages store
        self.views = views
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.seed = seed
        self.flip = flip

    def __len__(self) -> int:
        return len(self.rows)

    def view_for(self, index: int, epoch: int, width: int, height: int) -> View:
        if not self.augment:
            mode = next(iter(self.views.values())).resize_mode if self.views else "shortest"
            return eval_view(width, height, mode)
        rng = np.random.default_rng([self.seed, epoch, index])
        return random_view(rng, width, height, scale=self.crop_scale, flip=self.flip)

    def __getitem__(self, key: int) -> dict[str, Any]:
        epoch, i = divmod(int(key), len(self.rows))
        item: dict[str, Any] = {"index": i, "caption": self.rows.captions[i], "teacher_text": self.rows.teacher_text(i)}
        path = self.rows.images[i]
        if self.views and path is not None:
            try:
                image, size = self.reader.open(path)
            except Exception as e:  # a bad file (even one deleted mid-run) must not stop a long run
                return {"index": i, "skip": read_problem(path, e)}
            problem = image_problem(*size)
            if problem:
                return {"index": i, "skip": problem}
            view = self.view_for(i, epoch, *size)  # from the original size: packed copies replay the same crop
            item["views"] = {k: crop_uint8(image, view, cfg) for k, cfg in self.views.items()}
        return item


def make_collate(tokenizers: dict[str, Callable[[list[str]], Any]],
                 priority: Callable[[list[str], Any], Any] | None = None) -> Callable:
    """Collate items into ``{"index", "captions", "views", "tokens": {key: tokenized}, "skipped"}``.

    ``skipped`` lists ``(row, reason)`` of the items left out (unreadable images; with tokenizers,
    rows without a caption); a batch whose every item was left out holds only ``skipped``. The
    ``"teacher"`` tokenizer reads each row's teacher text (its caption, or the source sentence of
    parallel data); the others read the captions. ``priority(captions, student tokens)`` adds
    ``token_priority`` (each student token's word class, for a syntax mask)."""

    def collate(items: list[dict]) -> dict[str, Any]:
        skipped = [(it["index"], it["skip"]) for it in items if "skip" in it]
        good = [it for it in items if "skip" not in it]
        if tokenizers:
            skipped += [(it["index"], "empty caption") for it in good if not it["caption"]]
            good = [it for it in good if it["caption"]]
        batch: dict[str, Any] = {"skipped": skipped}
        if not good:
            return batch
        batch["index"] = torch.tensor([it["index"] for it in good])
        batch["captions"] = [it["caption"] for it in good]
        if "views" in good[0]:
            batch["views"] = {k: torch.stack([it["views"][k] for it in good]) for k in good[0]["views"]}
        teacher_texts = [it.get("teacher_text") or it["caption"] for it in good]
        batch["tokens"] = {k: tok(teacher_texts if k == "teacher" else batch["captions"]) for k, tok in tokenizers.items()}
        if priority is not None and "student" in batch["tokens"]:
            batch["token_priority"] = priority(batch["captions"], batch["tokens"]["student"])
        return batch

    return collate


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless shuffled batches, deterministic from (seed, epoch); starts at ``start_batch``.

    Yields indices ``epoch * n + i`` so the dataset knows the epoch without shared state. With
    ``lengths`` (each row's token count) batches hold rows of similar length, as transformers'
    ``group_by_length``: each run of ``group`` shuffled batches is sorted by length and cut again,
    then the epoch's batches are shuffled, so text students pad far less.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_batch: int = 0, drop_last: bool = True,
                 lengths: Sequence[int] | None = None, group: int = 32):
        if n == 0:
            raise DataError("no usable rows to train on")
        if lengths is not None and len(lengths) != n:
            raise ValueError(f"lengths: {len(lengths)} values for {n} rows")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.drop_last = drop_last and n >= batch_size
        self.per_epoch = n // batch_size if self.drop_last else -(-n // batch_size)
        self.lengths = None if lengths is None else np.asarray(lengths)
        self.group = max(1, int(group))

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        perm = np.random.default_rng([self.seed, 10_007, epoch]).permutation(self.n)
        if self.lengths is None:
            return [perm[k * self.batch_size:(k + 1) * self.batch_size] for k in range(self.per_epoch)]
        perm = perm[:self.per_epoch * self.batch_size] if self.drop_last else perm
        chunk, batches = self.group * self.batch_size, []
        for start in range(0, len(perm), chunk):
            part = perm[start:start + chunk]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            batches += [part[k:k + self.batch_size] for k in range(0, len(part), self.batch_size)]
        order = np.random.default_rng([self.seed, 10_007, epoch, 1]).permutation(len(batches))
        return [batches[k] for k in order]

    def __iter__(self):
        epoch, b = divmod(self.start_batch, self.per_epoch)
        while True:
            batches = self._epoch(epoch)
            for k in range(b, self.per_epoch):
                yield [int(epoch * self.n + i) for i in batches[k]]
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # endless; accelerate asks for a length
        return 1 << 40
