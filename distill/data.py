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
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .transforms import PreprocessCfg, View, crop_uint8, eval_view, random_view, to_rgb

log = logging.getLogger(__name__)

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_KEYS = ("image", "image_path", "filepath", "file_name", "filename", "file", "path", "img")
CAPTION_KEYS = ("caption", "text", "captions", "sentence", "title", "prompt")
LABEL_KEYS = ("label", "class", "class_name", "category")


@dataclass
class Rows:
    """Flat image-caption pairs (one row per caption); ``labels``/``classes`` for class folders."""

    images: list[str | None]
    captions: list[str | None]
    labels: list[int] | None = None
    classes: list[str] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def has_images(self) -> bool:
        return any(i is not None for i in self.images)

    @property
    def has_text(self) -> bool:
        return any(c for c in self.captions)

    def subset(self, idx: Sequence[int]) -> "Rows":
        return Rows(
            [self.images[i] for i in idx], [self.captions[i] for i in idx],
            [self.labels[i] for i in idx] if self.labels is not None else None, self.classes, self.source,
        )


def _pick(keys: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str, where: str) -> str | None:
    if wanted is not None:
        if wanted not in keys:
            raise KeyError(f"{where}: no {what} column {wanted!r}; columns are {list(keys)}")
        return wanted
    lower = {k.lower().strip(): k for k in keys}
    return next((lower[c] for c in candidates if c in lower), None)


def _resolve(path: str, base: Path) -> str:
    if "://" in path:
        return path
    p = Path(os.path.expanduser(path))
    return str(p if p.is_absolute() else (base / p))


def _from_records(records: list[dict], base: Path, where: str, image_key: str | None, caption_key: str | None) -> Rows:
    keys = list({k: None for r in records for k in r})
    ik = _pick(keys, image_key, IMAGE_KEYS, "image", where)
    ck = _pick(keys, caption_key, CAPTION_KEYS, "caption", where)
    if ik is None and ck is None:
        raise KeyError(f"{where}: found neither an image column {IMAGE_KEYS} nor a caption column {CAPTION_KEYS}; "
                       f"columns are {keys}")
    lk = _pick(keys, None, LABEL_KEYS, "label", where)
    images, captions, raw_labels = [], [], []
    for r in records:
        img = r.get(ik) if ik else None
        img = _resolve(str(img), base) if img not in (None, "") else None
        caps = r.get(ck) if ck else None
        caps = caps if isinstance(caps, list) else [caps]
        for c in caps:
            images.append(img)
            captions.append(None if c is None else str(c).strip())
            raw_labels.append(r.get(lk) if lk else None)
    rows = Rows(images, captions, source=where)
    if lk and all(v not in (None, "") for v in raw_labels):
        rows.labels, rows.classes = _labels(raw_labels, base)
    return rows


def _labels(raw: list, base: Path) -> tuple[list[int], list[str]]:
    """Class indices and names: integer labels take their names from a ``classes.csv`` (label,name)
    beside the file when there is one; otherwise the label values are the class names."""
    names_file = base / "classes.csv"
    if all(str(v).strip().isdigit() for v in raw) and names_file.exists():
        table = {int(r["label"]): r["name"] for r in _read_table(names_file, ",")}
        classes = [table[i] for i in sorted(table)]
        return [int(v) for v in raw], classes
    classes = sorted({str(v) for v in raw})
    index = {c: i for i, c in enumerate(classes)}
    return [index[str(v)] for v in raw], classes


def _read_table(path: Path, delimiter: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return out


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
        raise FileNotFoundError(f"data source {str(source)!r} does not exist")
    if path.is_dir():
        return _load_folder(path, image_column, caption_column)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        records = _read_table(path, "\t" if suffix == ".tsv" else ",")
    elif suffix == ".jsonl":
        records = _read_jsonl(path)
    elif suffix == ".json":
        records = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects")
    elif suffix == ".txt":
        records = [{"caption": line.strip()} for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        raise ValueError(f"{path}: unsupported data file (use .csv, .tsv, .json, .jsonl, .txt or a folder)")
    return _from_records(records, path.parent, str(path), image_column, caption_column)


def _load_folder(path: Path, image_column: str | None, caption_column: str | None) -> Rows:
    for meta in ("metadata.jsonl", "metadata.csv"):
        if (path / meta).exists():
            return load_rows(path / meta, image_column, caption_column)
    tars = sorted(str(f) for f in path.glob("*.tar"))
    if tars and not any(f.suffix.lower() in IMAGE_EXTS for f in path.iterdir()):
        return _load_tars(tars, str(path))
    subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    if subdirs:  # class folders
        images, captions, labels = [], [], []
        classes = [d.name for d in subdirs]
        for label, d in enumerate(subdirs):
            for f in sorted(d.iterdir()):
                if f.suffix.lower() in IMAGE_EXTS:
                    images.append(str(f))
                    captions.append(f"a photo of a {d.name.replace('_', ' ')}.")
                    labels.append(label)
        return Rows(images, captions, labels, classes, source=str(path))
    files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    return Rows(files, [None] * len(files), source=str(path))


_TEXT_EXTS = (".txt", ".caption", ".cap")


def _load_tars(tars: list[str], where: str) -> Rows:
    """webdataset layout: members sharing a key (``dir/0001.jpg`` + ``dir/0001.txt``) form a sample."""
    import tarfile

    if not tars:
        raise FileNotFoundError(f"{where}: no .tar shards")
    images, captions = [], []
    for tar_path in tars:
        samples: dict[str, dict[str, Any]] = {}
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                key, ext = os.path.splitext(m.name)
                ext = ext.lower()
                if ext in IMAGE_EXTS:
                    samples.setdefault(key, {})["image"] = f"{os.path.abspath(tar_path)}::{m.name}"
                elif ext in _TEXT_EXTS or ext == ".json":
                    raw = tar.extractfile(m).read().decode("utf-8")
                    if ext == ".json":
                        meta = json.loads(raw)
                        raw = next((meta[k] for k in CAPTION_KEYS if k in meta), None)
                    if raw is not None:
                        samples.setdefault(key, {}).setdefault("captions", [])
                        samples[key]["captions"] += raw if isinstance(raw, list) else [raw]
        for key in sorted(samples):
            s = samples[key]
            for c in s.get("captions") or [None]:
                images.append(s.get("image"))
                captions.append(None if c is None else str(c).strip())
    return Rows(images, captions, source=where)


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
        raise KeyError(f"hf:{spec}: found neither an image column nor a caption column; columns are {cols}; "
                       "name them with image_column= / caption_column=")
    caps = ds[ck] if ck else [None] * len(ds)
    images, captions = [], []
    for i, c in enumerate(caps):
        for one in (c if isinstance(c, list) else [c]):
            images.append(f"hf://{source}@{split or 'train'}#{ik}/{i}" if ik else None)
            captions.append(None if one is None else str(one).strip())
    return Rows(images, captions, source=f"hf:{spec}")


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
    if src is not None and hasattr(src, "convert"):
        src.load()
        return to_rgb(src)
    with Image.open(src if src is not None else path) as im:
        im.load()
        return to_rgb(im)


class RawImages:
    """Decodes the original files: ``open(path) -> (RGB PIL image, (width, height))``."""

    def open(self, path: str):
        image = open_image(path)
        return image, image.size


class PairDataset(torch.utils.data.Dataset):
    """Serves rows as ``{"index", "caption", "views": {key: uint8 [3, S, S]}}``.

    ``views`` maps a key ("student", "teacher") to a PreprocessCfg; each key receives the
    *same* crop of the image at its own size (its normalisation is applied on the device, by the
    step module, with ``transforms.normalize``). The crop for item ``i`` in
    epoch ``e`` depends only on (seed, e, i), so a resumed run replays identical crops.
    Sampler indices encode the epoch: ``epoch * len(rows) + i``.
    """

    def __init__(
        self,
        rows: Rows,
        views: dict[str, PreprocessCfg],
        augment: bool = True,
        crop_scale: tuple[float, float] = (0.5, 1.0),
        seed: int = 0,
        reader: Any = None,
    ):
        self.rows = rows
        self.reader = reader or RawImages()  # or a PackedImages store
        self.views = views
        self.augment = augment
        self.crop_scale = tuple(crop_scale)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.rows)

    def view_for(self, index: int, epoch: int, width: int, height: int) -> View:
        if not self.augment:
            mode = next(iter(self.views.values())).resize_mode if self.views else "shortest"
            return eval_view(width, height, mode)
        rng = np.random.default_rng([self.seed, epoch, index])
        return random_view(rng, width, height, scale=self.crop_scale)

    def __getitem__(self, key: int) -> dict[str, Any] | None:
        epoch, i = divmod(int(key), len(self.rows))
        item: dict[str, Any] = {"index": i, "caption": self.rows.captions[i]}
        path = self.rows.images[i]
        if self.views and path is not None:
            try:
                image, size = self.reader.open(path)
            except Exception as e:  # a bad file (even one deleted mid-run) must not stop a long run
                log.warning("skipping row %d: cannot read image %s (%s)", i, path, e)
                return None
            view = self.view_for(i, epoch, *size)  # from the original size: packed copies replay the same crop
            item["views"] = {k: crop_uint8(image, view, cfg) for k, cfg in self.views.items()}
        return item


def make_collate(tokenizers: dict[str, Callable[[list[str]], Any]]) -> Callable:
    """Collate items into ``{"index", "captions", "views", "tokens": {key: tokenized}}``; drops
    unreadable items (None) and, when tokenizers are given, rows without a caption."""

    def collate(items: list[dict | None]) -> dict[str, Any] | None:
        items = [it for it in items if it is not None and (not tokenizers or it["caption"])]
        if not items:
            return None
        batch: dict[str, Any] = {
            "index": torch.tensor([it["index"] for it in items]),
            "captions": [it["caption"] for it in items],
        }
        if "views" in items[0]:
            batch["views"] = {k: torch.stack([it["views"][k] for it in items]) for k in items[0]["views"]}
        batch["tokens"] = {k: tok(batch["captions"]) for k, tok in tokenizers.items()}
        return batch

    return collate


class EpochBatchSampler(torch.utils.data.Sampler):
    """Endless shuffled batches, deterministic from (seed, epoch); starts at ``start_batch``.

    Yields indices ``epoch * n + i`` so the dataset knows the epoch without shared state.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, start_batch: int = 0, drop_last: bool = True):
        if n == 0:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed, self.start_batch = n, batch_size, seed, start_batch
        self.drop_last = drop_last and n >= batch_size
        self.per_epoch = n // batch_size if self.drop_last else -(-n // batch_size)

    def __iter__(self):
        epoch, b = divmod(self.start_batch, self.per_epoch)
        while True:
            perm = np.random.default_rng([self.seed, 10_007, epoch]).permutation(self.n)
            for k in range(b, self.per_epoch):
                idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
                yield [int(epoch * self.n + i) for i in idx]
            epoch, b = epoch + 1, 0

    def __len__(self) -> int:  # endless; accelerate asks for a length
        return 1 << 40
