"""The teacher service: run the frozen teacher once over the data and keep its embeddings on disk.

Layout of a cache folder::

    manifest.json                teacher identity, preprocessing, view policy, dtype, counts, fingerprint, shards
    images/shard_00000.npy       [n, K, D] image embeddings, K views per image (fp16 by default)
    images/shard_00000.views.npy [n, K, 5] the views (x0, y0, w, h, flip) as fractions of the image
    images/shard_00000.json      the image ids of the rows and the images skipped in this shard (written last)
    texts/shard_00000.npy        [n, D] caption embeddings
    texts/shard_00000.json
    skipped.jsonl                every image or caption that was skipped, with the reason

View 0 is the teacher's own eval transform; views 1..K-1 are random-resized crops + flips whose
parameters depend only on (seed, image id, view), so a student replays exactly the same crop at its
own resolution. Work is cut into shards in a fixed order before anything is encoded, and a shard
counts as done only when its JSON exists (written last, atomically): a build killed at any point
resumes at the first missing shard and ends byte-for-byte equal to an uninterrupted one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .data import RawImages, Rows, as_rows, open_image
from .io import atomic_write_bytes, read_format_json, read_json, write_json
from .transforms import PreprocessCfg, View, apply_view, crop_resize, crop_uint8, eval_view, normalize, random_view

log = logging.getLogger(__name__)

FORMAT = "clip-distill-cache/1"
DTYPES = {"fp16": np.float16, "fp32": np.float32}


class CacheMismatchError(ValueError):
    """The cache was built with another teacher or preprocessing; the message names the field."""


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:20]


def image_id(path: str, root: str | None = None) -> str:
    """Stable id of an image: its path relative to the data root plus its size in bytes (a replaced
    file of another size gets a new id); moving the whole data folder keeps the ids."""
    rel = os.path.relpath(path, root) if root and os.path.isabs(path) else path
    try:
        size = os.path.getsize(path)
    except OSError:
        size = -1
    return _sha(f"{Path(rel).as_posix()}\0{size}")


def text_id(caption: str) -> str:
    return _sha("text\0" + caption)


def data_root(rows: Rows) -> str | None:
    src = Path(rows.source) if rows.source else None
    if src is None:
        return None
    return str(src if src.is_dir() else src.parent)


def view_for(image_key: str, view: int, width: int, height: int, policy: dict[str, Any]) -> View:
    """View ``view`` of an image: 0 = eval transform, else a seeded random-resized crop + flip."""
    if view == 0:
        return eval_view(width, height, policy["resize_mode"])
    rng = np.random.default_rng([policy["seed"], int(image_key[:15], 16), view])
    return random_view(rng, width, height, scale=tuple(policy["scale"]), ratio=tuple(policy["ratio"]))


def _np_save(path: Path, array: np.ndarray) -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


# -- building ------------------------------------------------------------------------------------

class _ViewDataset(torch.utils.data.Dataset):
    """Decodes one image and returns its K views at the teacher's preprocessing."""

    def __init__(self, paths: list[str], keys: list[str], pre: PreprocessCfg, policy: dict[str, Any], reader=None):
        self.paths, self.keys, self.pre, self.policy = paths, keys, pre, policy
        self.reader = reader or RawImages()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image, size = self.reader.open(self.paths[i])
        except Exception as e:  # missing, truncated or not an image: reported, never fatal
            return {"i": i, "error": f"{type(e).__name__}: {e}"}
        views = [view_for(self.keys[i], v, *size, self.policy) for v in range(self.policy["views"])]
        crops = np.stack([crop_resize(image, v, self.pre.image_size, self.pre.interpolation) for v in views])
        # uint8 crosses to the main process (4x less than float); normalised on the teacher's device
        return {"i": i, "pixels": torch.from_numpy(crops).permute(0, 3, 1, 2), "views": np.stack([v.as_array() for v in views])}


def _collate(items):
    """Stack in the worker: one tensor per batch crosses to the main process, not one per image."""
    ok = [it for it in items if "error" not in it]
    return {
        "index": [it["i"] for it in items],
        "ok": [it["i"] for it in ok],
        "errors": {it["i"]: it["error"] for it in items if "error" in it},
        "pixels": torch.cat([it["pixels"] for it in ok]) if ok else None,  # [n_ok * K, 3, S, S]
        "views": np.stack([it["views"] for it in ok]) if ok else None,
    }


@dataclass
class BuildSummary:
    images_encoded: int = 0
    texts_encoded: int = 0
    images_cached: int = 0
    texts_cached: int = 0
    skipped: int = 0
    seconds: float = 0.0
    image_seconds: float = 0.0  # the image pass alone (decode + teacher), without captions
    images_per_s: float = 0.0  # views encoded per second of the image pass

    def line(self) -> str:
        return (f"cache: encoded {self.images_encoded} images ({self.images_per_s:,.0f} views/s) and "
                f"{self.texts_encoded} captions; {self.images_cached} images and {self.texts_cached} captions "
                f"in the cache; {self.skipped} skipped (see skipped.jsonl)")


class TeacherService:
    """Builds and extends an embedding cache for ``teacher`` in ``cache_dir``.

    Args:
        teacher: a frozen Teacher (``load_teacher``).
        cache_dir: the cache folder (created if missing).
        dtype: ``fp16`` (default) or ``fp32`` storage.
        shard_size: images (or captions) per shard.
        batch_size / num_workers: teacher batch and decoding workers.
        device: where the teacher runs (default: the GPU when there is one).
        amp: bf16/fp16 autocast on the GPU.
        reader: where image pixels come from: None decodes the files, a ``PackedImages`` store reads
            pre-resized bytes (``distill data pack``).

    Example:
        >>> TeacherService(load_teacher("openclip_vit_b32"), "cache/b32").build("pairs.csv", views=4)
    """

    def __init__(self, teacher, cache_dir: str | os.PathLike, dtype: str = "fp16", shard_size: int = 4096,
                 batch_size: int = 256, num_workers: int = 4, device: str | torch.device | None = None,
                 amp: bool = True, progress: bool = True, reader: Any = None):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {list(DTYPES)}")
        self.teacher = teacher
        self.dir = Path(cache_dir)
        self.dtype, self.shard_size, self.batch_size = dtype, shard_size, batch_size
        self.num_workers, self.amp, self.progress = num_workers, amp, progress
        self.device = torch.device(device) if device is not None else _default_device()
        self.reader = reader  # a PackedImages store: decode-free builds

    # the fields a cache and a teacher must agree on
    def expected(self, views: int, seed: int, scale: Sequence[float], ratio: Sequence[float]) -> dict[str, Any]:
        pre = self.teacher.preprocess
        return {
            "format": FORMAT,
            "teacher": self.teacher.identity,
            "preprocess": pre.to_dict() if pre else None,
            "view_policy": {"views": views, "seed": seed, "scale": list(scale), "ratio": list(ratio),
                            "resize_mode": pre.resize_mode if pre else "shortest"},
            "dtype": self.dtype,
            "embed_dim": self.teacher.embed_dim,
        }

    def build(self, data: Any, views: int = 1, seed: int = 0, scale: Sequence[float] = (0.35, 1.0),
              ratio: Sequence[float] = (3 / 4, 4 / 3), on_shard: Callable[[str, int], None] | None = None,
              **row_kwargs: Any) -> BuildSummary:
        """Encode every image (``views`` views each) and caption of ``data`` that the cache lacks.

        Under ``accelerate launch`` every process plans the same shards, encodes every n-th one on its
        own GPU, and the main process writes the manifest once all are done."""
        tic = time.perf_counter()
        rank, world, barrier, device = _process()
        if device is not None and self.device.type == "cuda":
            self.device = device
        rows = as_rows(data, **row_kwargs)
        self.dir.mkdir(parents=True, exist_ok=True)
        if rank == 0:  # before the other processes write anything
            for tmp in self.dir.rglob(".*.tmp"):  # leftovers of a killed build
                tmp.unlink(missing_ok=True)
            manifest = self._start_manifest(views, seed, scale, ratio)
        barrier()
        if rank != 0:
            manifest = self._start_manifest(views, seed, scale, ratio)  # checks and reads it
        summary = BuildSummary()
        self.teacher.to(self.device)
        image_plan = self.plan_images(rows) if self.teacher.has_image and rows.has_images else None
        text_plan = self.plan_texts(rows) if self.teacher.has_text else None
        barrier()  # every process has planned before any shard is written
        if image_plan is not None:
            t0 = time.perf_counter()
            summary.images_encoded = self.encode_images(image_plan, manifest, on_shard, rank, world)
            summary.image_seconds = time.perf_counter() - t0
        if text_plan is not None:
            summary.texts_encoded = self.encode_texts(text_plan, on_shard, rank, world)
        barrier()
        if rank != 0:
            return summary
        manifest = self.finish_manifest(manifest)
        summary.images_cached = manifest["counts"]["images"]
        summary.texts_cached = manifest["counts"]["texts"]
        summary.skipped = manifest["counts"]["skipped"]
        summary.seconds = time.perf_counter() - tic
        summary.images_per_s = summary.images_encoded * views / max(summary.image_seconds, 1e-9)
        log.info(summary.line())
        return summary

    def _start_manifest(self, views, seed, scale, ratio) -> dict[str, Any]:
        expected = self.expected(views, seed, scale, ratio)
        path = self.dir / "manifest.json"
        if path.exists():
            current = read_json(path)
            diff = compare(current, expected)
            if diff:
                raise CacheMismatchError(f"{self.dir} holds a cache built differently ({diff}); "
                                         "build into another folder or delete this one")
            return current
        manifest = {**expected, "complete": False, "counts": {"images": 0, "texts": 0, "skipped": 0},
                    "fingerprint": None, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(path, manifest)
        return manifest

    def _done(self, kind: str) -> tuple[set[str], int]:
        """Ids already in finished shards (and skipped there), and the next shard number."""
        seen, n = set(), 0
        for meta in sorted((self.dir / kind).glob("shard_*.json")):
            m = read_json(meta)
            seen.update(m["ids"])
            seen.update(s["id"] for s in m.get("skipped", []))
            n = max(n, int(meta.stem.split("_")[1]) + 1)
        return seen, n

    def plan_images(self, rows: Rows) -> tuple[list[tuple[str, str]], list[tuple[int, int, int]]]:
        """Images the cache lacks, cut into numbered shards (number, start, end) before anything runs:
        the same cut on every process and after every restart, which makes resumed and split builds
        identical to a plain one."""
        root = data_root(rows)
        paths = list(dict.fromkeys(p for p in rows.images if p))  # unique, first-seen order
        keys = [image_id(p, root) for p in paths]
        done, first_shard = self._done("images")
        pending = [(p, k) for p, k in zip(paths, keys) if k not in done]
        shards = [(first_shard + j, s0, min(s0 + self.shard_size, len(pending)))
                  for j, s0 in enumerate(range(0, len(pending), self.shard_size))]
        return pending, shards

    def encode_images(self, plan, manifest: dict[str, Any], on_shard=None, rank: int = 0, world: int = 1) -> int:
        """Encode and write this process's share (every ``world``-th shard) of an image plan."""
        pending, shards = plan[0], plan[1][rank::world]
        if not shards:
            return 0
        policy = manifest["view_policy"]
        ds = _ViewDataset([p for p, _ in pending], [k for _, k in pending], self.teacher.preprocess, policy,
                          self.reader)
        batches = [list(range(b, min(b + self.batch_size, e))) for _, s0, e in shards
                   for b in range(s0, e, self.batch_size)]  # batches never cross a shard boundary
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=_collate,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        bar = _bar(sum(e - s0 for _, s0, e in shards) * policy["views"], "cache images", self.progress, unit="view")
        dtype = DTYPES[self.dtype]
        emb, vws, ids, skipped, encoded = [], [], [], [], 0
        current = iter(shards)
        shard_no, _, shard_end = next(current)
        for batch in loader:
            for i, error in batch["errors"].items():
                p, k = pending[i]
                skipped.append({"id": k, "image": p, "reason": error})
            if batch["ok"]:
                z = self._encode_images(batch["pixels"]).view(len(batch["ok"]), policy["views"], -1)
                emb.append(z.numpy().astype(dtype))
                vws.extend(batch["views"])
                ids.extend(pending[i][1] for i in batch["ok"])
                encoded += len(batch["ok"])
            bar.update(len(batch["index"]) * policy["views"])
            if batch["index"][-1] + 1 == shard_end:
                self._write_image_shard(shard_no, emb, vws, ids, skipped, policy)
                if on_shard:
                    on_shard("images", shard_no)
                emb, vws, ids, skipped = [], [], [], []
                shard_no, _, shard_end = next(current, (None, None, None))
        bar.close()
        return encoded

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = normalize(pixels.to(self.device, non_blocking=True), self.teacher.preprocess)
        with _autocast(self.device, self.amp):
            return self.teacher.encode_image(pixels).float().cpu()

    def _write_image_shard(self, n, emb, vws, ids, skipped, policy) -> None:
        d = self.teacher.embed_dim
        k = policy["views"]
        arr = np.concatenate(emb) if emb else np.zeros((0, k, d), DTYPES[self.dtype])
        views = np.stack(vws).astype(np.float32) if vws else np.zeros((0, k, 5), np.float32)
        base = self.dir / "images" / f"shard_{n:05d}"
        _np_save(base.with_suffix(".npy"), arr)
        _np_save(base.parent / f"{base.name}.views.npy", views)
        write_json(base.with_suffix(".json"), {"rows": len(ids), "ids": ids, "skipped": skipped})

    def plan_texts(self, rows: Rows) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
        """Captions the cache lacks, cut into numbered shards (number, start)."""
        captions = list(dict.fromkeys(c for c in rows.captions if c is not None))
        done, first_shard = self._done("texts")
        pending = [(c, text_id(c)) for c in captions if text_id(c) not in done]
        return pending, [(first_shard + j, s0) for j, s0 in enumerate(range(0, len(pending), self.shard_size))]

    def encode_texts(self, plan, on_shard=None, rank: int = 0, world: int = 1) -> int:
        pending, shards = plan[0], plan[1][rank::world]
        encoded = 0
        bar = _bar(sum(len(pending[s0:s0 + self.shard_size]) for _, s0 in shards), "cache texts", self.progress,
                   unit="caption")
        for next_shard, s0 in shards:
            chunk = pending[s0:s0 + self.shard_size]
            good = [(c, k) for c, k in chunk if c.strip()]
            skipped = [{"id": k, "caption": c, "reason": "empty caption"} for c, k in chunk if not c.strip()]
            emb = []
            order = sorted(range(len(good)), key=lambda i: len(good[i][0]))  # similar lengths: less padding
            for b in range(0, len(good), self.batch_size):
                with _autocast(self.device, self.amp):
                    z = self.teacher.encode_text([good[i][0] for i in order[b:b + self.batch_size]])
                emb.append(z.float().cpu().numpy().astype(DTYPES[self.dtype]))
                bar.update(len(order[b:b + self.batch_size]))
            arr = np.zeros((len(good), self.teacher.embed_dim), DTYPES[self.dtype])
            if emb:
                arr[order] = np.concatenate(emb)
            base = self.dir / "texts" / f"shard_{next_shard:05d}"
            _np_save(base.with_suffix(".npy"), arr)
            write_json(base.with_suffix(".json"), {"rows": len(good), "ids": [k for _, k in good], "skipped": skipped})
            if on_shard:
                on_shard("texts", next_shard)
            encoded += len(good)
        bar.close()
        return encoded

    def finish_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Merge every finished shard into the manifest (shards, counts, fingerprint) and skipped.jsonl."""
        shards, counts, skipped, ids = {}, {"images": 0, "texts": 0}, [], []
        for kind in ("images", "texts"):
            shards[kind] = []
            for meta in sorted((self.dir / kind).glob("shard_*.json")):
                m = read_json(meta)
                shards[kind].append({"name": meta.stem, "rows": m["rows"]})
                counts[kind] += m["rows"]
                skipped.extend({"kind": kind, **s} for s in m.get("skipped", []))
                ids.extend(m["ids"])
        lines = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in skipped)
        atomic_write_bytes(self.dir / "skipped.jsonl", lines.encode("utf-8"))
        ids.sort()
        manifest.update(shards=shards, counts={**counts, "skipped": len(skipped)}, complete=True,
                        fingerprint=hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20])
        write_json(self.dir / "manifest.json", manifest)
        return manifest


def _process():
    """(rank, world, barrier, device): from accelerate when launched distributed, else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        state = PartialState()
        return state.process_index, state.num_processes, state.wait_for_everyone, state.device
    return 0, 1, lambda: None, None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return torch.autocast(device.type, enabled=False)


def _bar(total: int, desc: str, enabled: bool, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or total == 0, dynamic_ncols=True)


def compare(manifest: dict[str, Any], expected: dict[str, Any], keys: Sequence[str] | None = None) -> str:
    """'' when they agree, else which field differs (``teacher.weights: 'a' in the cache vs 'b' now``)."""
    diffs = []
    for key in keys or expected:
        a, b = manifest.get(key), expected.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    diffs.append(f"{key}.{sub}: {a.get(sub)!r} in the cache vs {b.get(sub)!r} now")
        elif a != b:
            diffs.append(f"{key}: {a!r} in the cache vs {b!r} now")
    return "; ".join(diffs)


# -- reading -------------------------------------------------------------------------------------

@dataclass
class EmbeddingCache:
    """Memory-mapped reader: ``image_embeddings(keys, views)`` / ``text_embeddings(keys)`` gather rows
    shard by shard from ``np.load(mmap_mode="r")`` arrays opened once."""

    path: Path
    manifest: dict[str, Any]
    image_index: dict[str, tuple[int, int]] = field(default_factory=dict)
    text_index: dict[str, tuple[int, int]] = field(default_factory=dict)
    _images: list[np.ndarray] = field(default_factory=list)
    _views: list[np.ndarray] = field(default_factory=list)
    _texts: list[np.ndarray] = field(default_factory=list)

    @classmethod
    def open(cls, path: str | os.PathLike) -> "EmbeddingCache":
        path = Path(path)
        manifest = read_format_json(path / "manifest.json", FORMAT, "build it with `distill cache build`")
        if not manifest.get("complete"):
            raise ValueError(f"{path}: the build did not finish; run `distill cache build` again to resume it")
        cache = cls(path, manifest)
        for s, shard in enumerate(manifest["shards"].get("images", [])):
            base = path / "images" / shard["name"]
            cache._images.append(np.load(base.with_suffix(".npy"), mmap_mode="r"))
            cache._views.append(np.load(base.parent / f"{shard['name']}.views.npy", mmap_mode="r"))
            cache.image_index.update({k: (s, r) for r, k in enumerate(read_json(base.with_suffix(".json"))["ids"])})
        for s, shard in enumerate(manifest["shards"].get("texts", [])):
            base = path / "texts" / shard["name"]
            cache._texts.append(np.load(base.with_suffix(".npy"), mmap_mode="r"))
            cache.text_index.update({k: (s, r) for r, k in enumerate(read_json(base.with_suffix(".json"))["ids"])})
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

    def image_embeddings(self, keys: Sequence[str], views: Sequence[int]) -> torch.Tensor:
        return self._gather(self._images, self.image_index, keys, views)

    def text_embeddings(self, keys: Sequence[str]) -> torch.Tensor:
        return self._gather(self._texts, self.text_index, keys)

    def _gather(self, arrays, index, keys, views=None) -> torch.Tensor:
        """One fancy-indexed memmap read per shard touched by the batch."""
        out = np.empty((len(keys), self.embed_dim), np.float32)
        loc = [index[k] for k in keys]
        for s in {s for s, _ in loc}:
            pos = [i for i, (si, _) in enumerate(loc) if si == s]
            rows = [loc[i][1] for i in pos]
            out[pos] = arrays[s][rows] if views is None else arrays[s][rows, [views[i] for i in pos]]
        return torch.from_numpy(out)

    def info(self) -> str:
        m = self.manifest
        t = m["teacher"]
        return "\n".join([
            f"cache      {self.path}",
            f"teacher    {t['backend']}:{t['name']}  weights {t['weights']}  dim {m['embed_dim']}",
            f"preprocess {m['preprocess']}",
            f"views      {m['view_policy']['views']} per image (0 = eval transform; seed {m['view_policy']['seed']})",
            f"rows       {m['counts']['images']} images, {m['counts']['texts']} captions, "
            f"{m['counts']['skipped']} skipped; dtype {m['dtype']}",
            f"shards     {len(m['shards'].get('images', []))} image, {len(m['shards'].get('texts', []))} text",
            f"fingerprint {m['fingerprint']}",
        ])

    def verify(self, teacher=None, sample: int = 32, rows: Rows | None = None) -> list[str]:
        """Problems found: shapes and counts against the manifest, non-finite or non-unit rows, and
        (with ``teacher`` and ``rows``) re-encoded samples that disagree with the stored embeddings."""
        problems = []
        for kind, arrays in (("images", self._images), ("texts", self._texts)):
            total = sum(len(a) for a in arrays)
            if total != self.manifest["counts"][kind]:
                problems.append(f"{kind}: {total} rows on disk, manifest says {self.manifest['counts'][kind]}")
            for shard, a in zip(self.manifest["shards"][kind], arrays):
                x = np.asarray(a, dtype=np.float32)
                if not np.isfinite(x).all():
                    problems.append(f"{kind}/{shard['name']}: non-finite values")
                norms = np.linalg.norm(x, axis=-1)
                if x.size and np.abs(norms - 1).max() > 1e-2:
                    problems.append(f"{kind}/{shard['name']}: rows are not unit-norm (max error {np.abs(norms - 1).max():.3g})")
        if teacher is not None and rows is not None:
            self.check(teacher)
            problems += self._resample(teacher, rows, sample)
        return problems

    def _resample(self, teacher, rows: Rows, sample: int) -> list[str]:
        root = data_root(rows)
        paths = [p for p in dict.fromkeys(p for p in rows.images if p) if image_id(p, root) in self.image_index]
        rng = np.random.default_rng(0)
        problems = []
        for p in rng.permutation(paths)[:sample] if paths else []:
            key = image_id(p, root)
            image = open_image(p)
            for v in range(self.views):
                z = teacher.encode_image(apply_view(image, self.view(key, v), teacher.preprocess)[None]).cpu()
                cos = float((z[0] * self.image_embeddings([key], [v])[0]).sum())
                if cos < 0.99:
                    problems.append(f"{p} view {v}: stored embedding has cosine {cos:.4f} to a fresh one")
        return problems


# -- training from the cache -----------------------------------------------------------------------

class CachedPairDataset(torch.utils.data.Dataset):
    """Rows served with the cache's stored view replayed at the student's preprocessing.

    Each item names the cache rows of its teacher targets; ``cached_collate`` gathers them per batch
    as memory-mapped slices. View ``v`` of item ``i`` in epoch ``e`` is drawn from (seed, e, i).
    """

    def __init__(self, rows: Rows, image_keys: list[str | None], text_keys: list[str | None],
                 cache: EmbeddingCache, student_pre: PreprocessCfg | None, augment: bool = True, seed: int = 0,
                 reader: Any = None):
        self.rows, self.image_keys, self.text_keys = rows, image_keys, text_keys
        self.cache, self.pre, self.augment, self.seed = cache, student_pre, augment, seed
        self.reader = reader or RawImages()  # or a PackedImages store (views are fractions: same crops)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int) -> dict[str, Any] | None:
        epoch, i = divmod(int(key), len(self.rows))
        item: dict[str, Any] = {"index": i, "caption": self.rows.captions[i], "text_key": self.text_keys[i],
                                "image_key": self.image_keys[i], "view": 0}
        if item["image_key"] is not None:
            if self.augment and self.cache.views > 1:
                item["view"] = int(np.random.default_rng([self.seed, epoch, i]).integers(self.cache.views))
            if self.pre is not None:
                try:
                    image, _ = self.reader.open(self.rows.images[i])
                except Exception as e:  # deleted or broken since the cache was built
                    log.warning("skipping row %d: cannot read image %s (%s)", i, self.rows.images[i], e)
                    return None
                item["views"] = {"student": crop_uint8(image, self.cache.view(item["image_key"], item["view"]), self.pre)}
        return item


def cached_collate(cache: EmbeddingCache, base_collate: Callable) -> Callable:
    """Wrap a collate so each batch also carries the teacher embeddings read from the cache."""

    def collate(items):
        items = [it for it in items if it is not None]
        batch = base_collate(items)
        if batch is None:
            return None
        in_batch = set(batch["index"].tolist())  # rows the base collate kept
        kept = [it for it in items if it["index"] in in_batch]
        emb = {}
        if all(it["image_key"] is not None for it in kept):
            emb["image"] = cache.image_embeddings([it["image_key"] for it in kept], [it["view"] for it in kept])
        if all(it["text_key"] is not None for it in kept):
            emb["text"] = cache.text_embeddings([it["text_key"] for it in kept])
        batch["teacher_emb"] = emb
        return batch

    return collate


def row_keys(rows: Rows, cache: EmbeddingCache) -> tuple[list[str | None], list[str | None], list[int]]:
    """Cache keys of every row, and the rows whose embeddings the cache lacks."""
    root = data_root(rows)
    ids = {p: image_id(p, root) for p in dict.fromkeys(p for p in rows.images if p)}
    image_keys = [ids[p] if p else None for p in rows.images]
    text_keys = [text_id(c) if c else None for c in rows.captions]
    missing = [i for i, (k, t) in enumerate(zip(image_keys, text_keys))
               if (k is not None and k not in cache.image_index) or (t is not None and t not in cache.text_index)]
    return image_keys, text_keys, missing
