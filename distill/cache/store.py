"""The cache on disk: the manifest, the shards, and the memory-mapped reader ``EmbeddingCache``.

Every shard's JSON (written last) holds its row keys, the real path, size and mtime of each image,
the items it skipped, the SHA-256 of its arrays, and the ``build`` key of what produced it (teacher
identity, preprocessing, view policy, dtype): shards of another build are refused even when the
manifest is gone, and ``distill cache verify`` finds any flipped byte.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import CacheError, CacheMismatchError
from ..io import file_digest, read_json
from ..transforms import View
from .keys import KeyIndex

FORMAT = "clip-distill-cache/2"
OLD_FORMATS = ("clip-distill-cache/1",)  # keyed images by path + size: cannot be matched to content keys
DTYPES = {"fp16": np.float16, "fp32": np.float32}
BUILD_FIELDS = ("teacher", "preprocess", "view_policy", "dtype", "embed_dim")
KINDS = ("images", "texts")


def build_fields(manifest: dict[str, Any]) -> dict[str, Any]:
    """The fields every shard of one cache must share (what produced its numbers), without info-only ones."""
    out = {k: manifest.get(k) for k in BUILD_FIELDS}
    if isinstance(out.get("teacher"), dict):
        out["teacher"] = {k: v for k, v in out["teacher"].items() if k not in INFO_ONLY}
    return out


def build_key(manifest: dict[str, Any]) -> str:
    """Hash of ``build_fields``: every shard records it."""
    return hashlib.sha256(json.dumps(build_fields(manifest), sort_keys=True).encode()).hexdigest()[:20]


INFO_ONLY = {"path"}  # recorded, never compared: where a teacher folder was when it was used


def compare(manifest: dict[str, Any], expected: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """'' when they agree, else which field differs (``teacher.weights: 'a' in the cache vs 'b' now``)."""
    diffs = []
    for key in keys or expected:
        a, b = manifest.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted((set(a) | set(b)) - INFO_ONLY):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!r} in the cache vs {b.get(sub)!r} now")
        elif a != b:
            diffs.append(f"{key}: {a!r} in the cache vs {b!r} now")
    return "; ".join(diffs)


def read_meta(path: Path) -> dict[str, Any]:
    """A shard's JSON; a damaged one names itself."""
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise CacheError(f"{path}: cannot be read ({e}); the shard is damaged: delete it and its .npy files, then "
                         "run `distill cache build` again to re-encode it") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("ids"), list):
        raise CacheError(f"{path}: not a cache shard record; delete it and run `distill cache build` again")
    return meta


def load_array(path: Path, mmap: bool = True) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # truncated, header damaged, not .npy at all
        raise CacheError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:100]}); the shard is damaged: "
                         "run `distill cache verify` on the cache, delete the damaged shard (its .npy and .json "
                         "files) and run `distill cache build` again to re-encode it") from None


def shard_files(base: Path, kind: str) -> dict[str, Path]:
    """The array files of a shard (``emb``, and ``views`` for images)."""
    files = {"emb": base.with_suffix(".npy")}
    if kind == "images":
        files["views"] = base.parent / f"{base.name}.views.npy"
    return files


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of a finished cache of this format, or a CacheError that says what to do."""
    file = path / "manifest.json"
    if not file.exists():
        raise CacheError(f"{path}: no manifest.json; build one with `distill cache build`" if path.exists()
                         else f"{path}: no such cache folder; build one with `distill cache build`")
    try:
        manifest = read_json(file)
    except (OSError, ValueError) as e:
        raise CacheError(f"{file}: cannot be read ({e}); rebuild the cache with `distill cache build`") from None
    fmt = manifest.get("format") if isinstance(manifest, dict) else None
    if fmt in OLD_FORMATS:
        raise CacheError(f"{path}: built by an older clip-distill ({fmt}) whose image keys depend on how paths are "
                         "spelled; rebuild it (`distill cache build ... --out` a new folder) to use it")
    if fmt != FORMAT:
        raise CacheError(f"{file}: format {fmt!r}, expected {FORMAT!r}")
    if not manifest.get("complete"):
        raise CacheError(f"{path}: the build did not finish; run `distill cache build` again to resume it")
    return manifest


@dataclass
class EmbeddingCache:
    """Memory-mapped reader: ``image_embeddings(keys, views)`` / ``text_embeddings(keys)`` gather rows
    shard by shard from arrays opened once. ``open`` checks every shard's shape, build and values."""

    path: Path
    manifest: dict[str, Any]
    image_index: dict[str, tuple[int, int]] = field(default_factory=dict)
    text_index: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_index: KeyIndex = field(default_factory=KeyIndex)
    skipped: dict[str, str] = field(default_factory=dict)  # key -> why the build skipped it
    _images: list[np.ndarray] = field(default_factory=list)
    _views: list[np.ndarray] = field(default_factory=list)
    _texts: list[np.ndarray] = field(default_factory=list)
    _paths: list[list[str]] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike, check_values: bool = True) -> "EmbeddingCache":
        """Open a finished cache; ``check_values`` also checks every stored row (finite unit vectors, crops
        inside the image), once per shard file: a check that passed is recorded (``checked.json``: each
        file's size and mtime) and not repeated while the file is unchanged. Rows are checked again as
        batches read them."""
        path = Path(path)
        cache = cls(path, read_manifest(path))
        m = cache.manifest
        k, d, build = int(m["view_policy"]["views"]), int(m["embed_dim"]), m["build"]
        entries = []
        checked = _Checked(path) if check_values else None
        for kind in KINDS:
            for s, shard in enumerate(m["shards"].get(kind, [])):
                base = path / kind / shard["name"]
                meta = read_meta(base.with_suffix(".json"))
                if meta.get("build") != build:
                    raise CacheMismatchError(f"{base}.json: built differently from the manifest (another teacher, "
                                             "preprocessing or view policy); rebuild the cache into a new folder")
                n = int(meta["rows"])
                if n != len(meta["ids"]) or n != int(shard["rows"]):
                    raise CacheError(f"{base}.json: {len(meta['ids'])} ids, {meta['rows']} rows, manifest says "
                                     f"{shard['rows']}; rebuild this shard")
                files = shard_files(base, kind)
                emb = load_array(files["emb"])
                want = (n, k, d) if kind == "images" else (n, d)
                if emb.shape != want:
                    raise CacheError(f"{files['emb']}: shape {emb.shape}, expected {want} from the manifest "
                                     f"(views {k}, dim {d}); rebuild this shard")
                if checked is not None and not checked.done(files["emb"]):
                    _check_finite(emb, files["emb"], meta)
                    checked.add(files["emb"])
                index = cache.image_index if kind == "images" else cache.text_index
                index.update({key: (s, r) for r, key in enumerate(meta["ids"])})
                cache.skipped.update({x["id"]: x.get("reason", "skipped") for x in meta.get("skipped", [])})
                if kind == "images":
                    views = load_array(files["views"])
                    if views.shape != (n, k, 5):
                        raise CacheError(f"{files['views']}: shape {views.shape}, expected {(n, k, 5)}; rebuild this shard")
                    if checked is not None and not checked.done(files["views"]):
                        _check_views(views, files["views"], meta)
                        checked.add(files["views"])
                    cache._images.append(emb)
                    cache._views.append(views)
                    cache._paths.append(meta.get("paths") or [""] * n)
                    for key, real, st in zip(meta["ids"], meta.get("paths", []), meta.get("stat", [])):
                        entries.append((real, st[0], st[1], key))
                else:
                    cache._texts.append(emb)
        cache.key_index = KeyIndex(entries)
        if checked is not None:
            checked.save()
        return cache

    @property
    def views(self) -> int:
        return int(self.manifest["view_policy"]["views"])

    @property
    def embed_dim(self) -> int:
        return int(self.manifest["embed_dim"])

    def check(self, teacher=None, allow_stale: bool = False) -> None:
        """Raise CacheMismatchError naming the field when ``teacher`` differs from the cache's."""
        if teacher is None or allow_stale:
            return
        expected = {"teacher": teacher.identity, "preprocess": teacher.preprocess.to_dict() if teacher.preprocess else None}
        diff = compare(self.manifest, expected, keys=("teacher", "preprocess"))
        if diff:
            raise CacheMismatchError(f"cache {self.path} does not match the teacher: {diff}. "
                                     "Rebuild the cache, or pass allow_stale=True (--allow-stale) to use it anyway.")

    def view(self, key: str, v: int) -> View:
        s, r = self.image_index[key]
        return View.from_array(self._views[s][r, v])

    def path_of(self, key: str) -> str:
        """The real path an image had when it was encoded ('' when unknown)."""
        s, r = self.image_index[key]
        return self._paths[s][r]

    def closest(self, path: str) -> str | None:
        """The cached image path most like ``path`` (same file name first): for "not in the cache" hints."""
        names: dict[str, str] = {}
        for paths in self._paths:
            for p in paths:
                names.setdefault(os.path.basename(p), p)
        base = os.path.basename(path.split("::")[-1])
        if base in names:
            return names[base]
        close = difflib.get_close_matches(base, list(names), n=1, cutoff=0.5)
        return names[close[0]] if close else None

    def image_embeddings(self, keys: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        return self._gather(self._images, self.image_index, keys, views)

    def text_embeddings(self, keys: Sequence[str]) -> torch.Tensor:
        return self._gather(self._texts, self.text_index, keys)

    def _gather(self, arrays, index, keys, views=None) -> torch.Tensor:
        """One fancy-indexed memmap read per shard touched by the batch; every row read is checked (a
        damaged one names its shard and row instead of becoming a training target)."""
        out = np.empty((len(keys), self.embed_dim), np.float32)
        loc = [index[k] for k in keys]
        for s in sorted({s for s, _ in loc}):
            pos = [i for i, (si, _) in enumerate(loc) if si == s]
            rows = [loc[i][1] for i in pos]
            out[pos] = arrays[s][rows] if views is None else arrays[s][rows, [views[i] for i in pos]]
        bad = bad_rows(out)
        if bad.any():
            s, r = loc[int(np.argmax(bad))]
            kind = "images" if arrays is self._images else "texts"
            shard = self.manifest["shards"][kind][s]["name"]
            raise damaged(self.path / kind / f"{shard}.npy", read_meta(self.path / kind / f"{shard}.json"), r,
                          out[int(np.argmax(bad))])
        return torch.from_numpy(out)

    def info(self) -> str:
        m = self.manifest
        t = m["teacher"]
        vp = m["view_policy"]
        return "\n".join([
            f"cache      {self.path}",
            f"teacher    {t['backend']}:{t['name']}  weights {t['weights']}  dim {m['embed_dim']}",
            f"preprocess {m['preprocess']}",
            f"views      {vp['views']} per image (0 = eval transform; crops of area {vp['scale']}, "
            f"flip {'on' if vp.get('flip') else 'off'}, seed {vp['seed']})",
            f"rows       {m['counts']['images']} images, {m['counts']['texts']} captions, "
            f"{m['counts']['skipped']} skipped; dtype {m['dtype']}",
            f"shards     {len(m['shards'].get('images', []))} image, {len(m['shards'].get('texts', []))} text",
            f"fingerprint {m['fingerprint']}",
        ])

    def verify(self, teacher=None, sample: int = 32, rows: Any = None) -> list[str]:
        """Problems found: checksums (any flipped byte), non-finite or non-unit rows, and (with
        ``teacher`` and ``rows``) re-encoded samples that disagree with the stored embeddings."""
        problems = []
        for kind in KINDS:
            for shard in self.manifest["shards"].get(kind, []):
                base = self.path / kind / shard["name"]
                own = read_meta(base.with_suffix(".json")).get("sha256") or {}  # the shard's own record
                for part, f in shard_files(base, kind).items():
                    want = (shard.get("sha256") or {}).get(part)
                    got = file_digest(f) if want or own.get(part) else None
                    if want and got != want and got == own.get(part):
                        problems.append(f"{self.path / 'manifest.json'}: the checksum it records for {f.name} differs "
                                        "from the shard's own record, which the file matches (the manifest changed "
                                        "after the build); run `distill cache build` again on the same data to "
                                        "rewrite it")
                    elif want and got != want:
                        problems.append(f"{f}: checksum differs from the manifest (the file changed after the build)")
            for shard, a in zip(self.manifest["shards"].get(kind, []), self._images if kind == "images" else self._texts):
                x = np.asarray(a, dtype=np.float32)
                if not np.isfinite(x).all():
                    problems.append(f"{kind}/{shard['name']}: non-finite values")
                    continue
                norms = np.linalg.norm(x, axis=-1)
                if x.size and np.abs(norms - 1).max() > 1e-2:
                    problems.append(f"{kind}/{shard['name']}: rows are not unit-norm (max error {np.abs(norms - 1).max():.3g})")
        if teacher is not None and rows is not None:
            self.check(teacher)
            problems += self._resample(teacher, rows, sample)
        return problems

    def _resample(self, teacher, rows, sample: int) -> list[str]:
        from ..data import open_image
        from ..transforms import apply_view
        from .keys import image_keys

        paths = list(dict.fromkeys(p for p in rows.images if p))
        keys, _ = image_keys(paths, self.key_index, progress=False)
        found = [(p, k) for p, k in zip(paths, keys) if k in self.image_index]
        problems = []
        for j in np.random.default_rng(0).permutation(len(found))[:sample] if found else []:
            p, key = found[j]
            image = open_image(p)
            for v in range(self.views):
                z = teacher.encode_image(apply_view(image, self.view(key, v), teacher.preprocess)[None]).cpu()
                cos = float((z[0] * self.image_embeddings([key], [v])[0]).sum())
                if cos < 0.99:
                    problems.append(f"{p} view {v}: stored embedding has cosine {cos:.4f} to a fresh one")
        return problems


class _Checked:
    """Shard files whose values were checked, by name, size and mtime (``checked.json`` in the cache): a start
    reads each shard's values once, not at every open. Only the main process records; a read-only cache is
    checked at every open."""

    FILE = "checked.json"

    def __init__(self, folder: Path):
        self.folder = folder
        try:
            self.seen: dict[str, list[int]] = read_json(folder / self.FILE)
        except (OSError, ValueError):
            self.seen = {}
        self.new = False

    @staticmethod
    def _stat(file: Path) -> list[int]:
        st = file.stat()
        return [st.st_size, st.st_mtime_ns]

    def done(self, file: Path) -> bool:
        return self.seen.get(str(file.relative_to(self.folder))) == self._stat(file)

    def add(self, file: Path) -> None:
        self.seen[str(file.relative_to(self.folder))] = self._stat(file)
        self.new = True

    def save(self) -> None:
        from .. import dist
        from ..io import write_json

        if self.new and dist.is_main():
            try:
                write_json(self.folder / self.FILE, self.seen)
            except OSError:  # a read-only cache: checked again next time
                pass


def _check_views(views: np.ndarray, file: Path, meta: dict[str, Any]) -> None:
    """Stored crops must be boxes inside the image: x0, y0 >= 0, w, h in (0, 1], x0 + w <= 1, y0 + h <= 1."""
    v = np.asarray(views, dtype=np.float64)
    if not len(v):
        return
    eps = 1e-4
    ok = np.isfinite(v).all(-1) & (v[..., 0] >= -eps) & (v[..., 1] >= -eps) & (v[..., 2] > 0) & (v[..., 3] > 0) \
        & (v[..., 0] + v[..., 2] <= 1 + eps) & (v[..., 1] + v[..., 3] <= 1 + eps)
    if not ok.all():
        r = int(np.argwhere(~ok)[0][0])
        what = (meta.get("paths") or [None] * (r + 1))[r] or meta["ids"][r]
        raise CacheError(f"{file}: row {r} ({what}) holds an impossible crop {v[r][~ok[r]][0].tolist()}; the shard is "
                         "damaged: delete it (its .npy and .json files) and run `distill cache build` again")


NORM_TOLERANCE = 0.02  # stored embeddings are unit vectors; fp16 rounding moves a norm by ~1e-3


def bad_rows(block: np.ndarray) -> np.ndarray:
    """Mask of the rows of ``block`` ([n, D] or [n, K, D]) that are not finite unit vectors (a flipped
    exponent bit gives a finite but wrong row)."""
    x = np.asarray(block, dtype=np.float32)
    finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.linalg.norm(np.where(np.isfinite(x), x, 0), axis=-1).reshape(len(x), -1)
    return ~finite | (np.abs(norms - 1) > NORM_TOLERANCE).any(axis=1)


def damaged(file: Path, meta: dict[str, Any], r: int, row: np.ndarray) -> CacheError:
    what = meta.get("paths", [None] * (r + 1))[r] if meta.get("paths") else None
    row = np.asarray(row, dtype=np.float64)
    problem = "NaN/inf teacher embeddings" if not np.isfinite(row).all() else \
        f"a teacher embedding that is not a unit vector (norm {float(np.linalg.norm(row, axis=-1).max()):.4g})"
    return CacheError(f"{file}: row {r} ({what or meta['ids'][r]}) holds {problem}; the shard is damaged: delete it "
                      "(its .npy and .json files) and run `distill cache build` again")


def _check_finite(arr: np.ndarray, file: Path, meta: dict[str, Any], chunk: int = 65536) -> None:
    """Scan a shard for rows that are not finite unit vectors (chunked: memory stays small); name the first."""
    for start in range(0, len(arr), chunk):
        block = arr[start:start + chunk]
        bad = bad_rows(block)
        if bad.any():
            raise damaged(file, meta, start + int(np.argmax(bad)), block[int(np.argmax(bad))])
