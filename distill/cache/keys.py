"""Cache keys: an image is keyed by its bytes, a caption by its text.

An image's key is a hash of its content, so the same picture has the same key however it is reached:
from two CSVs, through a symlink, by a relative path from another folder, as in-memory ``Rows`` with
another ``source``, or after the whole data folder moved. An edited file gets a new key (a path + size
key would silently keep the old embedding of a same-sized edit). Reading every byte at every run would
cost a pass over the data, so a build records each encoded file's real path, size and mtime: a file
whose three match is keyed from that record without being read (``KeyIndex``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

KEY_CHARS = 20  # hex digits: 80 bits, no collision in any realistic data set
MISSING = "missing:"  # prefix of the key of a file that could not be read (kept per path, so a later build retries it)


def _hex(h) -> str:
    return h.hexdigest()[:KEY_CHARS]


def text_key(caption: str) -> str:
    return _hex(hashlib.sha1(("text\0" + caption).encode("utf-8")))


def bytes_key(data: bytes) -> str:
    return _hex(hashlib.sha1(data))


def _file_key(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return _hex(h)


def locate(path: str) -> tuple[str, tuple[int, int] | None]:
    """(real path, (size, mtime_ns)) of a file or a tar member (``tar::member``: the tar's stat);
    stat is None when the file does not exist. Dataset rows (``hf://``) have no stat."""
    if path.startswith("hf://"):
        return path, None
    file, sep, member = path.partition("::")
    real = os.path.realpath(file)
    try:
        st = os.stat(real)
    except OSError:
        return real + sep + member, None
    if not stat.S_ISREG(st.st_mode):  # a folder, a pipe (opening it would block), a device
        return real + sep + member, None
    return real + sep + member, (st.st_size, st.st_mtime_ns)


def content_key(path: str) -> str:
    """Hash of the image's bytes (a file, a tar member or a dataset row); ``missing:...`` when unreadable."""
    from ..data import image_bytes, is_member, read_errors

    try:
        if not path.startswith("hf://") and not stat.S_ISREG(os.stat(path.partition("::")[0]).st_mode):
            raise ValueError("not a regular file")
        return bytes_key(image_bytes(path)) if is_member(path) else _file_key(path)
    except read_errors():  # missing, unreadable: a row the run skips; the key is per path so a fixed file gets read
        return MISSING + bytes_key(os.path.abspath(path).encode("utf-8"))


class StoredKeys:
    """A ``KeyIndex`` kept on disk (SQLite, in the clip-distill cache folder) across runs: content keys of
    images a run hashed before, by real path, size and mtime. An online run's data fingerprint hashes each
    image once, not at every start. Unwritable (a read-only home): it keeps nothing, and nothing fails."""

    def __init__(self, path: str | os.PathLike | None = None):
        from ..io import cache_root

        self.path = Path(path) if path is not None else cache_root() / "image_keys.sqlite"
        self._db = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=30)
            self._db.execute("CREATE TABLE IF NOT EXISTS keys (path TEXT PRIMARY KEY, size INTEGER, mtime INTEGER, "
                             "key TEXT)")
        except (sqlite3.Error, OSError) as e:  # a cache we cannot keep is no error
            log.info("image keys are not kept between runs (%s: %s)", self.path, e)
            self._db = None

    def index(self, located: Sequence[tuple[str, tuple[int, int] | None]]) -> KeyIndex:
        """The stored keys of the files ``located`` names (real path, stat)."""
        found: list[tuple[str, int, int, str]] = []
        reals = [r for r, st in located if st is not None]
        for i in range(0, len(reals), 900) if self._db is not None else ():
            part = reals[i:i + 900]
            found += self._db.execute(f"SELECT path, size, mtime, key FROM keys WHERE path IN "
                                      f"({','.join('?' * len(part))})", part).fetchall()
        return KeyIndex(found)

    def add(self, located: Sequence[tuple[str, tuple[int, int] | None]], keys: Sequence[str]) -> None:
        if self._db is None:
            return
        rows = [(r, st[0], st[1], k) for (r, st), k in zip(located, keys) if st is not None
                and not k.startswith(MISSING)]
        try:
            with self._db:
                self._db.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?, ?)", rows)
        except (sqlite3.Error, OSError) as e:  # a read-only or full disk: keys are simply hashed again next time
            log.info("image keys not stored (%s: %s)", self.path, e)


class KeyIndex:
    """real path -> (size, mtime_ns, key) of files whose content was hashed before."""

    def __init__(self, entries: Iterable[tuple[str, int, int, str]] = ()):
        self._known = {p: (size, mtime, key) for p, size, mtime, key in entries}

    def __len__(self) -> int:
        return len(self._known)

    def get(self, real: str, stat: tuple[int, int] | None) -> str | None:
        hit = self._known.get(real)
        return hit[2] if hit is not None and stat is not None and hit[:2] == stat else None

    def add(self, real: str, stat: tuple[int, int] | None, key: str) -> None:
        if stat is not None and not key.startswith(MISSING):
            self._known[real] = (*stat, key)

    def paths(self) -> dict[str, str]:
        """key -> one real path it was seen at (for "closest cached" hints)."""
        return {key: p for p, (_, _, key) in self._known.items()}


SAMPLE = 16  # files whose recorded key is checked against their bytes at every lookup


def _recorded_keys_hold(paths: Sequence[str], keys: Sequence[str | None], sample: int) -> bool:
    """Re-hash a random ``sample`` of the files keyed from a record: False (and a warning naming one) when a
    file's bytes changed although its size and mtime did not (an in-place edit that restored them)."""
    import random

    known = [i for i, k in enumerate(keys) if k is not None and "::" not in paths[i] and not paths[i].startswith("hf://")]
    for i in random.SystemRandom().sample(known, min(sample, len(known))):
        if content_key(paths[i]) != keys[i]:
            log.warning("%s: its content changed since the cache recorded it, with the same size and modification "
                        "time; every image is hashed again", paths[i])
            return False
    return True


def image_keys(paths: Sequence[str], index: KeyIndex | None = None, progress: bool = True,
               workers: int = 8, sample: int = SAMPLE) -> tuple[list[str], list[tuple[str, tuple[int, int] | None]]]:
    """Keys of ``paths`` (content hashes; from ``index`` when a file's real path, size and mtime match, with
    ``sample`` of those checked against their bytes), and each path's (real path, stat) so a build can
    record them. A file edited in place with its size and mtime restored, outside the sample, keeps its
    old key: ``distill cache verify --teacher`` re-encodes samples to find it."""
    index = index or KeyIndex()
    located = [locate(p) for p in paths]
    keys: list[str | None] = [index.get(real, st) for real, st in located]
    if not _recorded_keys_hold(paths, keys, sample):
        keys = [None] * len(paths)  # a file changed behind its size and mtime: trust no record, hash them all
    todo = [i for i, k in enumerate(keys) if k is None]
    if todo:
        from ..progress import progress as report

        files = [i for i in todo if "::" not in paths[i] and not paths[i].startswith("hf://")]
        plain = set(files)
        others = [i for i in todo if i not in plain]  # tar handles are not shared across threads
        with ThreadPoolExecutor(workers) as pool, report(len(todo), "hash images", "img",
                                                         enabled=progress and len(todo) >= 2000) as bar:
            for i, key in zip(files, pool.map(content_key, [paths[i] for i in files])):
                keys[i] = key
                bar.update(1)
            for i in others:
                keys[i] = content_key(paths[i])
                bar.update(1)
    return keys, located  # type: ignore[return-value]
