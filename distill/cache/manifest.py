"""A cache folder's records of itself: the manifest a build starts and finishes, and what its finished shards
hold. A shard counts as done only when its JSON exists (written last, atomically)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from ..errors import CacheError, CacheMismatchError
from ..io import atomic_write_bytes, read_json, write_json
from .store import FORMAT, KINDS, build_fields, compare, read_meta


def start_manifest(folder: Path, expected: dict[str, Any]) -> dict[str, Any]:
    """The manifest of the build ``expected`` describes: the folder's own when it is of that build, a new one
    (not complete) when the folder holds no shard of another build."""
    path = folder / "manifest.json"
    if path.exists():
        try:
            current = read_json(path)
        except ValueError as e:
            raise CacheError(f"{path}: cannot be read ({e}); delete the cache folder and build again") from None
        if current.get("format") != FORMAT:
            raise CacheError(f"{folder}: holds a cache of another format ({current.get('format')!r}); "
                             "build into a new folder")
        diff = compare(current, {k: v for k, v in expected.items() if k != "build"})
        if diff:
            raise CacheMismatchError(f"{folder} holds a cache built differently ({diff}); "
                                     "build into another folder or delete this one")
        return current
    foreign = foreign_shards(folder, expected)
    if foreign:
        raise CacheMismatchError(f"{folder} has no manifest.json but holds {foreign}; they cannot be "
                                 "added to: build into another folder, or delete this one")
    manifest = {**expected, "complete": False, "counts": {"images": 0, "texts": 0, "skipped": 0},
                "fingerprint": None, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_json(path, manifest)
    return manifest

def foreign_shards(folder: Path, expected: dict[str, Any]) -> str:
    """'' when the folder holds no shard, or only shards of this very build (a lost manifest is
    rewritten then), else what the others are. A build writes its manifest before any shard."""
    other, unknown, diff = 0, 0, ""
    for kind in KINDS:
        for meta in (folder / kind).glob("shard_*.json"):
            try:
                m = read_json(meta)
            except ValueError:
                unknown += 1
                continue
            if m.get("build") != expected["build"]:
                other += 1
                diff = diff or compare(m.get("built_with") or {}, build_fields(expected))
        unknown += sum(1 for f in (folder / kind).glob("shard_*.npy")
                       if not (f.parent / (f.name.split(".")[0] + ".json")).exists())
    parts = [f"{other} shards built differently ({diff or 'another teacher, preprocessing or view policy'})"] \
        if other else []
    parts += [f"{unknown} shard files of unknown origin"] if unknown else []
    return " and ".join(parts)

def done_keys(folder: Path, kind: str, build: str) -> tuple[set[str], int]:
    """Keys already in finished shards (and skipped there), and the next shard number."""
    seen, n = set(), 0
    for meta_file in sorted((folder / kind).glob("shard_*.json")):
        m = read_meta(meta_file)
        if m.get("build") != build:
            raise CacheMismatchError(f"{meta_file}: built with another teacher, preprocessing or view policy "
                                     "than this cache's manifest; build into another folder")
        seen.update(m["ids"])
        seen.update(s["id"] for s in m.get("skipped", []))
        n = max(n, int(meta_file.stem.split("_")[1]) + 1)
    return seen, n

def build_key_of(folder: Path) -> str:
    return read_json(folder / "manifest.json")["build"]

def recorded_paths(folder: Path):
    """(real path, size, mtime_ns, key) of every image the finished shards recorded."""
    for meta_file in sorted((folder / "images").glob("shard_*.json")):
        m = read_meta(meta_file)
        for key, real, st in zip(m["ids"], m.get("paths", []), m.get("stat", [])):
            yield real, st[0], st[1], key

def finish_manifest(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Merge every finished shard into the manifest (shards, checksums, counts, fingerprint) and skipped.jsonl."""
    shards, counts, skipped, ids = {}, {"images": 0, "texts": 0}, [], []
    for kind in KINDS:
        shards[kind] = []
        for meta_file in sorted((folder / kind).glob("shard_*.json")):
            m = read_meta(meta_file)
            shards[kind].append({"name": meta_file.stem, "rows": m["rows"], "sha256": m.get("sha256", {})})
            counts[kind] += m["rows"]
            skipped.extend({"kind": kind, **s} for s in m.get("skipped", []))
            ids.extend(m["ids"])
    lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
    atomic_write_bytes(folder / "skipped.jsonl", lines.encode("utf-8"))
    ids.sort()
    manifest.update(shards=shards, counts={**counts, "skipped": len(skipped)}, complete=True,
                    fingerprint=hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20])
    write_json(folder / "manifest.json", manifest)
    return manifest
