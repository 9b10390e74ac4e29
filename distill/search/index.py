"""A photo index: every photo of a source embedded once by a student, searched by text or by example photo.

Layout of an index folder::

    index.json        format, the model that embedded the photos (name, weights ids), counts, the generation
                      the vector file holds
    photos.sqlite     the truth: one row per distinct photo (content key, vector), the paths it was found at
                      (with size and mtime), the photos that could not be read and why
    vectors.usearch   the search structure (usearch, cosine, float16), rebuilt from photos.sqlite when stale

Photos are keyed by content (``cache.keys``), as the teacher cache keys them: indexing again embeds only
new or changed photos (a file whose path, size and mtime are known is not read again), photos gone from
the source leave the index, and the same photo at two paths is one row. Vectors are committed to SQLite
batch by batch, so a stopped run keeps what it embedded; the vector file is written whole and renamed into
place. usearch (Unum, Apache-2.0) is one small wheel with numpy as its only heavy dependency, keeps
float16 vectors, adds and removes by key, and memory-maps a saved index read-only; below ``EXACT`` photos
it searches exhaustively, so results do not depend on graph parameters.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from ..data import photo_paths
from ..errors import PhotoIndexError
from ..io import atomic_write, json_object, write_json

log = logging.getLogger(__name__)

FORMAT = "clip-distill-index/1"
META, DB, VECTORS = "index.json", "photos.sqlite", "vectors.usearch"
EXACT = 200_000  # photos: exhaustive search below this many (a few ms at 10k on a CPU)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS photos (id INTEGER PRIMARY KEY, key TEXT UNIQUE NOT NULL, vector BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS paths (path TEXT PRIMARY KEY, real TEXT, size INTEGER, mtime INTEGER, key TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS paths_by_key ON paths (key);
CREATE TABLE IF NOT EXISTS skipped (path TEXT PRIMARY KEY, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
"""


@dataclass
class Hit:
    path: str  # where the photo was found (the first of its paths)
    score: float  # cosine similarity to the query
    key: str  # content key
    paths: list[str] = field(default_factory=list)  # every path it was found at


@dataclass
class IndexSummary:
    photos: int  # distinct photos in the index now
    paths: int
    embedded: int  # photos embedded by this run
    removed: int  # photos that left the index
    skipped: list[tuple[str, str]]  # (path, why) of photos that could not be read
    seconds: float


class PhotoIndex:
    """An index folder. ``writable``: opened to add and remove photos (``index_photos`` does that)."""

    def __init__(self, folder: str | os.PathLike, writable: bool = False):
        self.folder = Path(os.path.expanduser(str(folder)))
        self.meta = json_object(self.folder / META)
        if not str(self.meta.get("format", "")).startswith("clip-distill-index"):
            what = "no such folder" if not self.folder.exists() else "not a photo index (no index.json)"
            raise PhotoIndexError(f"{self.folder}: {what}: build one with `distill index SOURCE --model MODEL --out "
                              f"{self.folder}`")
        self.writable = writable
        self.db = _connect(self.folder / DB, writable)
        self._vectors = None

    # -- what it holds ------------------------------------------------------------------------------
    @property
    def model(self) -> dict[str, Any]:
        return self.meta.get("model", {})

    @property
    def embed_dim(self) -> int:
        return int(self.meta["embed_dim"])

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM photos").fetchone()[0]

    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE name = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def skipped(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT path, reason FROM skipped ORDER BY path").fetchall()

    def model_path(self) -> Path | None:
        """The model recorded at build time, resolved against the index folder (None when it is not there)."""
        rel = self.model.get("path")
        path = (self.folder / rel) if rel else None
        return path if path is not None and path.exists() else None

    def check_model(self, encoder: Any, tower: str) -> None:
        """Refuse an encoder whose ``tower`` would embed into another space than the photos were embedded in:
        the image tower must be the one that embedded them (an INT8 or FP32 export of the same weights is)."""
        ours, theirs = self.model.get("weights_ids", {}).get("image"), encoder.weights_ids.get("image")
        if ours and theirs and ours == theirs:
            return
        built = f"{self.folder} was built by {self.model.get('name')} (image weights {ours or 'unrecorded'})"
        if not encoder.has_image:
            raise PhotoIndexError(f"{built}; {encoder.name} has no image tower, so nothing shows that its {tower} "
                              f"embeddings match: search with {self.model.get('name')} or a model made from it")
        if ours and theirs:
            raise PhotoIndexError(f"{built}; {encoder.name} has other image weights ({theirs}), so its embeddings are "
                              f"not comparable: search with {self.model.get('name')} (or an export of it), or index "
                              "the photos again with this model into another folder")
        log.warning("%s; %s records no weights ids (an export made before 0.2): cannot check that it embeds as the "
                    "index does", built, encoder.name)

    # -- search -------------------------------------------------------------------------------------
    def vectors(self):
        """The usearch index of the photos: the saved file when it holds the current generation, else rebuilt
        from photos.sqlite (and saved when the folder is writable)."""
        if self._vectors is None:
            self._vectors = _load_vectors(self)
        return self._vectors

    def search(self, queries: np.ndarray, k: int = 10) -> list[list[Hit]]:
        """Top ``k`` photos of each query row (unit vectors in the index's space), best first."""
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.shape[1] != self.embed_dim:
            raise PhotoIndexError(f"{self.folder}: queries of dimension {queries.shape[1]}, the index holds "
                              f"{self.embed_dim}-dimensional photos")
        vectors = self.vectors()
        n = len(vectors)
        if n == 0:
            return [[] for _ in queries]
        found = vectors.search(queries, min(k, n), exact=n <= EXACT)
        keys = np.atleast_2d(found.keys)
        dist = np.atleast_2d(found.distances)
        out = []
        for row_keys, row_dist in zip(keys, dist):
            ids = [int(i) for i in row_keys if int(i) != np.iinfo(np.uint64).max]
            info = self._photos(ids)
            out.append([Hit(info[i][1][0], float(1.0 - d), info[i][0], info[i][1]) for i, d in zip(ids, row_dist)
                        if i in info])
        return out

    def _photos(self, ids: Sequence[int]) -> dict[int, tuple[str, list[str]]]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.db.execute(f"SELECT photos.id, photos.key, paths.path FROM photos JOIN paths ON paths.key = "
                               f"photos.key WHERE photos.id IN ({marks}) ORDER BY paths.path", list(ids)).fetchall()
        out: dict[int, tuple[str, list[str]]] = {}
        for i, key, path in rows:
            out.setdefault(i, (key, []))[1].append(path)
        return out

    def path_of(self, key: str) -> str | None:
        """A path of the photo with content key ``key`` (None when the index does not hold it)."""
        row = self.db.execute("SELECT path FROM paths WHERE key = ? ORDER BY path LIMIT 1", (key,)).fetchone()
        return row[0] if row else None

    def vector_of(self, key: str) -> np.ndarray | None:
        row = self.db.execute("SELECT vector FROM photos WHERE key = ?", (key,)).fetchone()
        return np.frombuffer(row[0], dtype=np.float16).astype(np.float32) if row else None

    def close(self) -> None:
        self.db.close()


# -- opening ----------------------------------------------------------------------------------------
def _connect(path: Path, writable: bool) -> sqlite3.Connection:
    try:
        if writable:
            db = sqlite3.connect(str(path), timeout=30)
            db.executescript(_SCHEMA)
        else:  # a read-only folder or medium: no journal is written; callers serialise access (serve: a lock)
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30, check_same_thread=False)
            db.execute("SELECT COUNT(*) FROM photos").fetchone()
        return db
    except sqlite3.Error as e:
        how = "written" if writable else "read"
        raise PhotoIndexError(f"{path}: the index cannot be {how} ({e}){_hint(path.parent, writable)}") from None


def _hint(folder: Path, writable: bool) -> str:
    if writable and folder.exists() and not os.access(folder, os.W_OK):
        return ": the folder is read-only; index into a folder you can write"
    return ": index the photos again into a new folder" if not writable else ""


def _usearch_index():
    """usearch's ``Index`` class, with onnxruntime (when installed) loaded first: onnxruntime's import crashes the
    process (SIGSEGV) once usearch's compiled module is loaded (usearch 2.26 + onnxruntime 1.32 on Linux), and an
    ONNX encoder may be opened after the index."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        pass
    from usearch.index import Index

    return Index


def _load_vectors(index: PhotoIndex):
    Index = _usearch_index()

    path = index.folder / VECTORS
    gen = index.generation()
    if path.is_file() and index.meta.get("vectors_generation") == gen:
        try:
            return Index.restore(str(path), view=not index.writable)
        except (RuntimeError, ValueError, OSError) as e:  # a damaged file: it is derived data, rebuild it
            log.warning("%s: unreadable (%s); rebuilding it from %s", path, e, DB)
    vectors = Index(ndim=index.embed_dim, metric="cos", dtype="f16")
    ids, rows = [], []
    for i, blob in index.db.execute("SELECT id, vector FROM photos ORDER BY id"):
        ids.append(i)
        rows.append(np.frombuffer(blob, dtype=np.float16))
    if ids:
        vectors.add(np.asarray(ids, dtype=np.uint64), np.stack(rows).astype(np.float32))
    if index.writable:
        _save_vectors(index, vectors, gen)
    return vectors


def _save_vectors(index: PhotoIndex, vectors: Any, gen: int) -> None:
    atomic_write(index.folder / VECTORS, lambda f: f.write(bytes(vectors.save())))
    index.meta = {**index.meta, "vectors_generation": gen, "photos": len(index), "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(index.folder / META, index.meta)


# -- building ---------------------------------------------------------------------------------------
def index_photos(source: Any, out: str | os.PathLike, model: str | os.PathLike | Any, batch_size: int = 32,
                 workers: int = 4, progress: bool = True, device: str = "cpu") -> IndexSummary:
    """Index the photos of ``source`` into the folder ``out`` with ``model`` (a model folder or an
    ``Encoder``): new or changed photos are embedded, photos gone from ``source`` are removed, photos that
    cannot be read are skipped and listed (``IndexSummary.skipped``, ``distill index`` prints them)."""
    from ..cache.keys import MISSING, KeyIndex, image_keys
    from ..outputs import INDEX, claim
    from .encoders import Encoder, open_encoder

    tic = time.perf_counter()
    out = Path(os.path.expanduser(str(out)))
    model_dir = None if isinstance(model, Encoder) else Path(os.path.expanduser(str(model)))
    claim(out, "a photo index", {"the photos": source if isinstance(source, (str, os.PathLike)) else None,
                                 "the model": model_dir}, same=(INDEX,))
    encoder = model if isinstance(model, Encoder) else open_encoder(model, device=device)
    encoder._need("image")
    paths = photo_paths(source)
    index = _open_for_writing(out, encoder, model_dir)
    try:
        known = KeyIndex(index.db.execute("SELECT real, size, mtime, key FROM paths WHERE real IS NOT NULL"))
        keys, located = image_keys(paths, known, progress=progress)
        have = {k for (k,) in index.db.execute("SELECT key FROM photos")}
        skipped = {p: _unreadable(p) for p, k in zip(paths, keys) if k.startswith(MISSING)}
        todo: dict[str, str] = {}
        for p, k in zip(paths, keys):
            if not k.startswith(MISSING) and k not in have:
                todo.setdefault(k, p)
        current = index.meta.get("vectors_generation") == index.generation()  # the saved vectors are up to date
        first_new = index.db.execute("SELECT COALESCE(MAX(id), 0) FROM photos").fetchone()[0] + 1
        failed = _embed(index, encoder, todo, batch_size, workers, progress)
        skipped.update(failed)
        removed = _mirror(index, paths, keys, located, skipped)
        _update_vectors(index, removed if current else None, first_new)
        return IndexSummary(len(index), len(paths) - len(skipped), len(todo) - len(failed), len(removed),
                            sorted(skipped.items()), time.perf_counter() - tic)
    finally:
        index.close()


def _unreadable(path: str) -> str:
    from ..data import read_errors, read_problem, stat_problem

    problem = stat_problem(path)
    if problem:
        return problem
    try:
        from ..data import image_bytes

        image_bytes(path)
    except read_errors() as e:
        return read_problem(path, e)
    return "unreadable"


def _open_for_writing(out: Path, encoder: Any, model_dir: Path | None) -> PhotoIndex:
    meta = json_object(out / META)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK) or any(f.exists() and not os.access(f, os.W_OK) for f in (out / DB, out / META)):
        raise PhotoIndexError(f"{out}: the index folder is read-only (it can be searched, not updated); index into "
                              "a folder you can write")
    if not meta:
        ident = encoder.identity()
        if model_dir is not None:
            ident["path"] = Path(os.path.relpath(model_dir.resolve(), out.resolve())).as_posix()
        write_json(out / META, {"format": FORMAT, "model": ident, "embed_dim": encoder.embed_dim, "photos": 0,
                                "vectors_generation": -1})
    index = PhotoIndex(out, writable=True)
    try:
        index.check_model(encoder, "image")
    except PhotoIndexError:
        index.close()
        raise
    if index.embed_dim != encoder.embed_dim:
        index.close()
        raise PhotoIndexError(f"{out}: holds {index.embed_dim}-dimensional photos, {encoder.name} embeds "
                          f"{encoder.embed_dim}")
    return index


def _decode(path: str) -> tuple[Any, str | None]:
    from ..data import open_image, read_errors, read_problem

    try:
        return open_image(path, check=True), None
    except read_errors() as e:
        return None, read_problem(path, e)


def _embed(index: PhotoIndex, encoder: Any, todo: dict[str, str], batch_size: int, workers: int,
           progress: bool) -> dict[str, str]:
    """Embed one photo per key in ``todo`` (key -> path), committing each batch; returns {path: why} of
    those that could not be decoded."""
    from ..progress import progress as report

    failed: dict[str, str] = {}
    items = list(todo.items())
    with ThreadPoolExecutor(max(1, workers)) as pool, report(len(items), "index photos", "img",
                                                             enabled=progress and len(items) > 0) as bar:
        for chunk in _chunks(items, batch_size):
            decoded = list(pool.map(_decode, [p for _, p in chunk]))
            good = [(k, im) for (k, p), (im, why) in zip(chunk, decoded) if im is not None]
            failed.update({p: why for (_, p), (im, why) in zip(chunk, decoded) if im is None})
            if good:
                vectors = encoder.encode_images([im for _, im in good]).astype(np.float16)
                with index.db:  # one transaction per batch: a stopped run keeps every batch before it
                    index.db.executemany("INSERT OR IGNORE INTO photos (key, vector) VALUES (?, ?)",
                                         [(k, v.tobytes()) for (k, _), v in zip(good, vectors)])
                    _bump(index.db)
            bar.update(len(chunk))
    return failed


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]


def _bump(db: sqlite3.Connection) -> None:
    db.execute("INSERT INTO meta VALUES ('generation', '1') ON CONFLICT(name) DO UPDATE SET "
               "value = CAST(value AS INTEGER) + 1")


def _mirror(index: PhotoIndex, paths: list[str], keys: list[str], located: list, skipped: dict[str, str]) -> list[int]:
    """Make the index hold exactly the readable photos of this source: paths table, skipped list, and the
    removal of photos no path leads to any more. Returns the ids of the photos removed."""
    have = {k for (k,) in index.db.execute("SELECT key FROM photos")}
    rows = [(p, real, st[0] if st else None, st[1] if st else None, k)
            for p, k, (real, st) in zip(paths, keys, located) if p not in skipped and k in have]
    with index.db:
        index.db.execute("DELETE FROM paths")
        index.db.executemany("INSERT OR REPLACE INTO paths VALUES (?, ?, ?, ?, ?)", rows)
        index.db.execute("DELETE FROM skipped")
        index.db.executemany("INSERT INTO skipped VALUES (?, ?)", sorted(skipped.items()))
        gone = [i for (i,) in index.db.execute("SELECT id FROM photos WHERE key NOT IN (SELECT key FROM paths)")]
        if gone:
            index.db.execute("DELETE FROM photos WHERE key NOT IN (SELECT key FROM paths)")
        _bump(index.db)
    return gone


def _update_vectors(index: PhotoIndex, removed: list[int] | None, first_new: int) -> None:
    """Bring vectors.usearch to the current generation and save it whole: the saved file with ``removed`` taken
    out and the photos from id ``first_new`` on added, when it was current before this run (``removed`` is
    None otherwise); else rebuilt from photos.sqlite."""
    Index = _usearch_index()

    path, gen = index.folder / VECTORS, index.generation()
    vectors = None
    if removed is not None and path.is_file():
        try:
            vectors = Index.restore(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            log.warning("%s: unreadable (%s); rebuilding it from %s", path, e, DB)
    if vectors is None:
        index.meta = {**index.meta, "vectors_generation": -1}
        index._vectors = None
        index.vectors()  # rebuilt from photos.sqlite and saved
        return
    for i in removed:
        vectors.remove(i)
    new = index.db.execute("SELECT id, vector FROM photos WHERE id >= ? ORDER BY id", (first_new,)).fetchall()
    if new:
        vectors.add(np.asarray([i for i, _ in new], dtype=np.uint64),
                    np.stack([np.frombuffer(b, dtype=np.float16) for _, b in new]).astype(np.float32))
    _save_vectors(index, vectors, gen)
    index._vectors = vectors


__all__ = ["PhotoIndex", "Hit", "IndexSummary", "index_photos", "photo_paths", "FORMAT", "PhotoIndexError"]
