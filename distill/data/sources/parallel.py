"""Parallel sentences: a csv/tsv with one column per language, read as rows whose caption is what the student
reads and whose ``teacher_texts`` is what the teacher reads (``data.parallel_source`` / ``parallel_targets``)."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Sequence

from ...errors import DataError, DataNotFoundError
from ..images import IMAGE_EXTS
from ..rows import Rows
from .records import read_table, read_text_file

log = logging.getLogger(__name__)


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
    records, lines, _ = read_table(path, read_text_file(path), "\t" if path.suffix.lower() == ".tsv" else ",")
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
        targets = [c for c in _language_columns(values) if c != teacher_column]
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
    for col in [teacher_column, *targets]:
        _warn_mixed_scripts(path, col, values[col], lines)
    learn = targets + ([teacher_column] if keep_source and teacher_column not in targets else [])
    captions, teacher, out_lines = [], [], []
    empty = dict.fromkeys(learn, 0)
    for k, line in enumerate(lines):
        src = values[teacher_column][k] or None
        for col in learn:
            if not values[col][k] and src:  # no sentence in this language on this row: nothing to learn
                empty[col] += 1
                continue
            captions.append(values[col][k] or None)
            teacher.append(src)
            out_lines.append(line)
    if any(empty.values()):
        log.info("%s: empty cells are not trained on (%s)", path,
                 ", ".join(f"{col}: {n}" for col, n in empty.items() if n))
    return Rows([None] * len(captions), captions, source=str(path), lines=out_lines, teacher_texts=teacher,
                layout=f"parallel sentences ({teacher_column} -> {', '.join(learn)})")


# a language tag as a column header: ISO 639 code, optionally a region or script (de, zh-cn, pt_BR, zh-Hant)
_LANGUAGE = re.compile(r"^[a-z]{2,3}(?:[-_][A-Za-z0-9]{2,8})*$", re.IGNORECASE)


def _language_columns(values: dict[str, list[str]]) -> list[str]:
    """Columns whose header is a language code and whose values are sentences."""
    return [c for c, v in values.items() if _LANGUAGE.match(c) and not _not_sentences(v) and _wordy(v)]


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


def sentence_columns(source: str | os.PathLike) -> dict[str, list[str]]:
    """The columns of a csv/tsv whose header is a language code and whose values are sentences (a parallel file's
    languages), each as its non-empty values."""
    path = Path(os.path.expanduser(str(source)))
    records, _, _ = read_table(path, read_text_file(path), "\t" if path.suffix.lower() == ".tsv" else ",")
    columns = list(records[0]) if records else []
    values = {c: [(r.get(c) or "").strip() for r in records] for c in columns}
    found = {c: [v for v in values[c] if v] for c in _language_columns(values)}
    if not found:
        raise DataError(f"{path}: no column of sentences with a language code as its header (such as en, de or "
                        f"zh-cn); columns are {columns}")
    return found


# scripts a language is written in; Han, kana and their punctuation count as one (Japanese mixes them in a sentence)
_SCRIPT_GROUPS = {"HIRAGANA": "CJK", "KATAKANA": "CJK", "CJK": "CJK", "IDEOGRAPHIC": "CJK", "HANGUL": "HANGUL"}


def scripts_of(text: str) -> dict[str, int]:
    """How many of ``text``'s letters are in each script (``LATIN``, ``CJK``, ``CYRILLIC``, ``ARABIC``...)."""
    import unicodedata

    counts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            word = unicodedata.name(ch, "?").split(" ")[0]
            script = _SCRIPT_GROUPS.get(word, word)
            counts[script] = counts.get(script, 0) + 1
    return counts


def _warn_mixed_scripts(path: Path, column: str, values: Sequence[str], lines: Sequence[int]) -> None:
    """One line when rows of a language column have no letter in the script most of its rows use (English left
    untranslated in a Chinese column, a shifted column): those rows teach the student the wrong language. A
    Chinese row with a Latin word in it is not one of them."""
    counts = [scripts_of(v) if v else {} for v in values]
    mains = [max(c, key=c.get) for c in counts if c]
    if not mains:
        return
    from collections import Counter

    main = Counter(mains).most_common(1)[0][0]
    odd = [i for i, c in enumerate(counts) if c and main not in c]
    if odd:
        first = odd[0]
        log.warning("%s: column %r mixes scripts: %d of its %d rows have no %s letter, as most of it has (first: line "
                    "%d: %r); check those rows", path, column, len(odd), len(mains), main, lines[first],
                    values[first][:60])


def pair_by_image(source: Rows, others: dict[str, Rows], source_lang: str = "en") -> list[dict[str, str]]:
    """Captions of the same photos in other languages as parallel sentences, where nobody translated them: for
    each photo, every caption in each language of ``others`` beside every ``source_lang`` caption of that photo
    (columns ``source_lang`` and that language; the others left empty), the layout ``load_parallel`` reads. Such
    captions are written by looking at the photo, in the language's own words (a comparable corpus), where
    translated text has a translator's style. Photos are matched by their real path; photos one side lacks
    are left out."""
    def by_photo(rows: Rows) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for image, caption in zip(rows.images, rows.captions):
            if image and caption and caption.strip():
                out.setdefault(os.path.realpath(image), []).append(caption.strip())
        return out

    if source_lang in others:
        raise DataError(f"pair_by_image: {source_lang!r} is the source language and one of the others")
    src = by_photo(source)
    if not src:
        raise DataError(f"{source.source}: no photo with a caption ({source_lang}); pairing by photo needs photos "
                        "with captions")
    table: list[dict[str, str]] = []
    for lang, rows in others.items():
        theirs = by_photo(rows)
        if not theirs:
            raise DataError(f"{rows.source}: no photo with a caption ({lang}); pairing by photo needs photos with "
                            "captions")
        shared = [p for p in theirs if p in src]
        if not shared:
            raise DataError(f"{rows.source}: none of its photos has a caption in {source.source} ({source_lang}); "
                            "photos are matched by path")
        empty = dict.fromkeys([source_lang, *others], "")
        table += [{**empty, source_lang: a, lang: b} for p in shared for b in theirs[p] for a in src[p]]
    return table


def write_parallel(table: Sequence[dict[str, str]], out: str | os.PathLike) -> Path:
    """Write parallel sentences (one dict per row, a column per language) as a csv that ``load_parallel`` reads,
    atomically: a crash leaves the old file or none."""
    import csv
    import io

    from ...io import atomic_write_text

    columns = list(dict.fromkeys(c for row in table for c in row))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, restval="")
    w.writeheader()
    w.writerows(table)
    out = Path(out)
    atomic_write_text(out, buf.getvalue())
    return out
