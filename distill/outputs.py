"""Where commands write: one rule for every folder a command creates or replaces.

No command deletes, overwrites or mixes into a folder that holds something it did not write, or that
holds one of its own inputs: ``claim`` names what is there and stops (``RunConflictError``). A flag
(``--overwrite``, ``train.overwrite``) allows replacing another clip-distill artifact, never an input
and never files clip-distill did not write. Whole-folder artifacts (exports, data checks, packed
stores, tokenizers, saved models, reports) are written into a staging folder beside the target and
swapped into place when complete (``staged``), so a folder is always the old artifact or the new one.
"""
from __future__ import annotations

import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from .errors import RunConflictError
from .io import json_object


def _format(path: Path) -> str:
    return str(json_object(path).get("format") or "")


def _saved_model(folder: Path) -> bool:
    cfg = json_object(folder / "config.json")
    if str(cfg.get("format", "")).startswith("clip-distill-student"):
        return True
    # a damaged one (config.json unreadable): our own messages say to save it again
    return not cfg and (folder / "config.json").exists() and (folder / "model.safetensors").is_file()


RUN = "a training run"
CACHE = "a teacher cache"
SAVED_MODEL = "a saved model (student or teacher)"
REPORT = "an evaluation report"
INDEX = "a photo index"
# (what it is, test on the folder): the first that matches names the folder; order matters where
# layouts share files (an open_clip or sentence-transformers export also holds tokenizer files).
_KINDS: tuple[tuple[str, Callable[[Path], bool]], ...] = (
    (RUN, lambda d: (d / "run.json").is_file() or (d / "checkpoints").is_dir()),
    (CACHE, lambda d: _format(d / "manifest.json").startswith("clip-distill-cache")
     or any((d / "images").glob("shard_*.json")) or any((d / "texts").glob("shard_*.json"))),
    ("an open_clip export", lambda d: (d / "open_clip_config.json").is_file()),
    ("a sentence-transformers model", lambda d: (d / "modules.json").is_file()),
    ("an ONNX export", lambda d: (d / "onnx_config.json").is_file()),
    ("a vision-language adapter", lambda d: (d / "adapter_config.json").is_file()),
    (SAVED_MODEL, lambda d: _saved_model(d)),
    ("a timm model", lambda d: "architecture" in json_object(d / "config.json")),
    (INDEX, lambda d: _format(d / "index.json").startswith("clip-distill-index")),
    ("a packed image store", lambda d: _format(d / "index.json").startswith("clip-distill-pack")),
    ("a data check", lambda d: (d / "clean.jsonl").is_file() and (d / "report.json").is_file()),
    (REPORT, lambda d: (d / "report.md").is_file() and (d / "results.json").is_file()),
    ("a tokenizer", lambda d: (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()),
)
_TOKENIZER = ("tokenizer*", "vocab*", "merges.txt", "special_tokens_map.json", "added_tokens.json", "*.model")
_PARITY = ("parity.json", "parity.md", "README.md")
# what each kind of artifact writes at its top level: anything else there is someone else's
_OWNS: dict[str, tuple[str, ...]] = {
    RUN: ("run.json", "log.jsonl", "health.jsonl", "skipped.jsonl", "recipe.yaml", "checkpoints", "student", "model",
          "adapter", "features", "distill", "events.out.tfevents*"),
    CACHE: ("manifest.json", "images", "texts", "skipped.jsonl", "checked.json"),
    "an open_clip export": ("open_clip_config.json", "open_clip_model.safetensors", "timm", "text", *_TOKENIZER,
                            *_PARITY),
    "a sentence-transformers model": ("modules.json", "config.json", "model.safetensors", "[0-9]_*",
                                      "sentence_bert_config.json", "config_sentence_transformers.json", *_TOKENIZER,
                                      *_PARITY),
    "an ONNX export": ("onnx_config.json", "image.onnx", "text.onnx", "tokenizer", *_PARITY),
    "a vision-language adapter": ("adapter_config.json", "adapter.safetensors", "README.md"),
    SAVED_MODEL: ("config.json", "model.safetensors", "text", "eval", *_PARITY),
    "a timm model": ("config.json", "model.safetensors", *_PARITY),
    INDEX: ("index.json", "photos.sqlite", "photos.sqlite-journal", "vectors.usearch"),
    "a packed image store": ("index.json", "images_*.npy"),
    "a data check": ("clean.jsonl", "rejected.jsonl", "report.json"),
    REPORT: ("report.md", "results.json", "*.png"),
    "a tokenizer": _TOKENIZER,
}
STAGING = ".distill-staging-"  # prefix of the folders ``staged`` writes into (hidden, beside the target)


def model_folder(path: str | os.PathLike) -> Path:
    """The model a path names: a run folder's trained model (``student/``, or ``model/`` for a tune run), else
    the path itself."""
    path = Path(os.path.expanduser(str(path)))
    if not (path / "config.json").exists():
        for inner in ("student", "model"):
            if (path / inner / "config.json").exists():
                return path / inner
    return path


def _visible(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def describe(folder: str | os.PathLike) -> str | None:
    """What ``folder`` holds, in words (``"an ONNX export"``), ``"files clip-distill did not write (e.g. x)"``
    for other content, or None when it does not exist or is empty (hidden files aside)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        return "a file, not a folder"
    entries = _visible(folder)
    if not entries:
        return None
    for what, test in _KINDS:
        if test(folder):
            return what
    return f"files clip-distill did not write (e.g. {entries[0].name})"


def foreign(folder: str | os.PathLike, what: str) -> list[str]:
    """Entries of ``folder`` (an artifact of kind ``what``) that such an artifact does not write."""
    import fnmatch

    owns = _OWNS.get(what, ())
    return [p.name for p in _visible(Path(folder)) if not any(fnmatch.fnmatch(p.name, g) for g in owns)]


def written_by_us(what: str | None) -> bool:
    return what is not None and not what.startswith(("files ", "a file"))


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.expanduser(str(path)))


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def inputs_within(folder: str | os.PathLike, inputs: Mapping[str, str | os.PathLike | None]) -> list[tuple[str, str]]:
    """(what, path) of each input that is ``folder`` or lies inside it (real paths: symlinks followed)."""
    root = _real(folder)
    return [(what, str(p)) for what, p in inputs.items() if p and _inside(_real(p), root)]


def input_paths(values: Iterable[object]) -> list[str]:
    """The values (strings, nested lists and mappings) that name existing files or folders: what a recipe or
    a command reads from disk, found without knowing which option holds a path."""
    out: list[str] = []

    def walk(v: object) -> None:
        if isinstance(v, Mapping):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, (str, os.PathLike)) and str(v) and "://" not in str(v):
            text = str(v).split("::")[0]
            for prefix in ("hf:", "text:", "openclip:", "timm:"):
                text = text[len(prefix):] if text.startswith(prefix) else text
            if text and os.path.exists(os.path.expanduser(text)):
                out.append(text)

    for v in values:
        walk(v)
    return out


def inputs_of(reads: Mapping[str, object]) -> dict[str, str]:
    """``{what: path}`` of the values of ``reads`` (``{what: value or values}``) that name existing files or
    folders (``input_paths``), numbered when one ``what`` names several."""
    out: dict[str, str] = {}
    for what, value in reads.items():
        paths = input_paths([value])
        out.update({f"{what} ({i + 1})" if len(paths) > 1 else what: p for i, p in enumerate(paths)})
    return out


def image_folders(images: Iterable[str | None], limit: int = 10_000) -> list[str]:
    """The folders (or tar files) the images of a data set live in: a run reads every one of them."""
    seen: dict[str, None] = {}
    for p in images:
        if p and "://" not in p:
            seen.setdefault(os.path.dirname(p.split("::")[0]) if "::" not in p else p.split("::")[0], None)
            if len(seen) >= limit:
                break
    return list(seen)


def claim(out: str | os.PathLike, writes: str, inputs: Mapping[str, str | os.PathLike | None] = {},
          key: str = "--out", overwrite: bool = False, flag: str = "--overwrite",
          same: Iterable[str] = ()) -> str | None:
    """Check that ``out`` may receive ``writes`` (what the command writes, in words) and return what it holds
    now (None: nothing). Refused with one line naming the folder, what it holds and what to do when:
    an input lies in it; it holds files clip-distill did not write; it holds another artifact and
    ``overwrite`` is off. ``same``: kinds a command extends in place (a cache build adds to a cache)."""
    out = Path(os.path.expanduser(str(out)))
    found = inputs_within(out, inputs)
    if found:
        what, path = found[0]
        where = "is" if _real(path) == _real(out) else "holds"
        raise RunConflictError(f"{key}: {out} {where} {what} ({path}), an input of this command; writing {writes} "
                               "there would change what it reads: choose another folder")
    held = describe(out)
    if held is None or held in same:
        return held
    if not written_by_us(held):
        raise RunConflictError(f"{key}: {out} holds {held}; {writes} goes into an empty or new folder: choose one")
    if not overwrite:
        raise RunConflictError(f"{key}: {out} already holds {held}; choose another folder, or {flag} to replace it "
                               f"with {writes}")
    others = foreign(out, held)
    if others:  # replacing the folder would delete them too
        raise RunConflictError(f"{key}: {out} holds {held} and also files clip-distill did not write (e.g. "
                               f"{others[0]}); {writes} goes into an empty or new folder: choose one")
    return held


def _staging(out: Path) -> Path:
    return out.parent / f"{STAGING}{out.name}-{uuid.uuid4().hex[:8]}"


def final_name(folder: str | os.PathLike) -> str:
    """The name ``folder`` will have: a staging folder's target name, else its own."""
    name = Path(folder).name
    return name[len(STAGING):-9] if name.startswith(STAGING) and len(name) > len(STAGING) + 9 else name


@contextmanager
def staged(out: str | os.PathLike) -> Iterator[Path]:
    """Write a whole folder: yields an empty staging folder beside ``out``; when the block ends without an
    error it takes ``out``'s place (an old ``out`` is removed only after the new one is in place), and on
    an error it is removed and ``out`` is untouched."""
    out = Path(os.path.expanduser(str(out)))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(out)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace(tmp, out)


def replace(new: Path, out: Path) -> None:
    """Put folder ``new`` at ``out``: an existing ``out`` is moved aside first and deleted last."""
    _umask_mode(new)
    old = None
    if out.exists() or out.is_symlink():
        old = Path(f"{_staging(out)}.old")
        os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _umask_mode(folder: Path) -> None:
    """A staged folder gets the mode ``mkdir`` would give ``out`` (readable by others when the umask says so)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)


__all__ = ["RUN", "CACHE", "SAVED_MODEL", "REPORT", "describe", "claim", "staged", "replace", "inputs_within", "input_paths", "inputs_of", "foreign", "image_folders", "written_by_us"]
