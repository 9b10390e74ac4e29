"""Building and extending a cache: ``TeacherService(teacher, dir).build(data, views=K)``.

Work is cut into shards in a fixed order before anything is encoded, and a shard counts as done only
when its JSON exists (written last, atomically): a build killed at any point resumes at the first
missing shard and ends byte-for-byte equal to an uninterrupted one. Under ``accelerate launch`` every
process plans the same shards, encodes every n-th one, and the main process writes the manifest; no
process returns before the manifest is written.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..data import MIN_SIDE, RawImages, Rows, as_rows, image_problem, read_errors, read_problem
from ..dist import broadcast_object, stop_together
from ..errors import CacheError
from ..io import atomic_write_bytes, write_json
from ..transforms import PreprocessCfg, View, crop_resize, eval_view, normalize, random_view
from .keys import image_keys, text_key
from .manifest import build_key_of, done_keys, finish_manifest, recorded_paths, start_manifest
from .store import DTYPES, FORMAT, KINDS, build_fields, build_key

log = logging.getLogger(__name__)


def view_for(image_key: str, view: int, width: int, height: int, policy: dict[str, Any],
             size: int | None = None) -> View:
    """View ``view`` of an image: 0 = the teacher's eval transform (at its input ``size``), else a seeded
    random-resized crop (+ flip when the policy has it). Seeded by (seed, image key, view): the same image
    gets the same crops anywhere."""
    if view == 0:
        return eval_view(width, height, policy["resize_mode"], size)
    rng = np.random.default_rng([policy["seed"], int(image_key[-15:], 16), view])
    return random_view(rng, width, height, scale=tuple(policy["scale"]), ratio=tuple(policy["ratio"]),
                       flip=bool(policy.get("flip", False)))


def _np_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


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
        except read_errors() as e:  # missing, truncated or not an image: reported, never fatal
            return {"i": i, "error": read_problem(self.paths[i], e)}
        problem = image_problem(*size)  # the rule `distill data check` rejects by
        if problem:
            return {"i": i, "error": problem}
        views = [view_for(self.keys[i], v, *size, self.policy, self.pre.image_size) for v in range(self.policy["views"])]
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


@dataclass
class ImagePlan:
    """Images the cache lacks, in shards fixed before anything is encoded."""

    paths: list[str]
    keys: list[str]
    located: list[tuple[str, Any]]  # (real path, (size, mtime_ns)) per image
    shards: list[tuple[int, int, int]]  # (number, start, end)


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
        for name, value, low in (("shard_size", shard_size, 1), ("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
            if not isinstance(value, int) or value < low:
                raise CacheError(f"{name}={value!r}: must be an integer >= {low}")
        if dtype not in DTYPES:
            raise CacheError(f"dtype {dtype!r}: use one of {list(DTYPES)}")
        self.teacher = teacher
        self.dir = Path(cache_dir)
        self.dtype, self.shard_size, self.batch_size = dtype, shard_size, batch_size
        self.num_workers, self.amp, self.progress = num_workers, amp, progress
        self.device = torch.device(device) if device is not None else _default_device()
        self.reader = reader  # a PackedImages store: decode-free builds

    def expected(self, views: int, seed: int, scale: Sequence[float], ratio: Sequence[float],
                 flip: bool = False) -> dict[str, Any]:
        """The fields a cache and a teacher must agree on."""
        pre = self.teacher.preprocess
        m = {
            "format": FORMAT,
            "teacher": self.teacher.identity,
            "preprocess": pre.to_dict() if pre else None,
            "view_policy": {"views": views, "seed": seed, "scale": [float(x) for x in scale],
                            "ratio": [float(x) for x in ratio], "flip": bool(flip),
                            "resize_mode": pre.resize_mode if pre else "shortest"},
            "dtype": self.dtype,
            "embed_dim": self.teacher.embed_dim,
        }
        m["build"] = build_key(m)
        return m

    def build(self, data: Any, views: int = 1, seed: int = 0, scale: Sequence[float] = (0.5, 1.0),
              ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = False,
              on_shard: Callable[[str, int], None] | None = None, **row_kwargs: Any) -> BuildSummary:
        """Encode every image (``views`` views each) and caption of ``data`` that the cache lacks.

        ``scale`` / ``ratio`` / ``flip``: the random-resized crops of views 1..K-1 (view 0 is the
        teacher's eval transform). Under ``accelerate launch`` every process encodes its share."""
        _check_policy(views, scale, ratio)
        tic = time.perf_counter()
        rank, world, device = _process()
        if device is not None and self.device.type == "cuda":
            self.device = device
        rows = as_rows(data, **row_kwargs)
        expected = self.expected(views, seed, scale, ratio, flip)
        plans: tuple = (None, None)
        with stop_together("while checking the cache folder and planning the build"):
            if rank == 0:  # before any process writes anything; the plan hashes new images once, here
                self._check_place(rows)
                self._check_writable()
                for tmp in self.dir.rglob(".*.tmp"):  # leftovers of a killed build
                    tmp.unlink(missing_ok=True)
                start_manifest(self.dir, expected)
                plans = (self.plan_images(rows) if self.teacher.has_image and rows.has_images else None,
                         self.plan_texts(rows) if self.teacher.has_text else None)
        image_plan, text_plan = broadcast_object(plans, "the build's plan")  # the same shards on every process
        manifest = start_manifest(self.dir, expected)  # the main process's (checked against what this one expects)
        summary = BuildSummary()
        self.teacher.to(self.device)
        with stop_together("while encoding its shards of the cache"):
            if image_plan is not None:
                t0 = time.perf_counter()
                summary.images_encoded = self.encode_images(image_plan, manifest, on_shard, rank, world)
                summary.image_seconds = time.perf_counter() - t0
            if text_plan is not None:
                summary.texts_encoded = self.encode_texts(text_plan, manifest, on_shard, rank, world)
        with stop_together("while finishing the cache's manifest"):
            if rank == 0:
                manifest = finish_manifest(self.dir, manifest)  # no process reads the cache before it is complete
        if rank != 0:
            return summary
        summary.images_cached = manifest["counts"]["images"]
        summary.texts_cached = manifest["counts"]["texts"]
        summary.skipped = manifest["counts"]["skipped"]
        summary.seconds = time.perf_counter() - tic
        summary.images_per_s = summary.images_encoded * views / max(summary.image_seconds, 1e-9)
        log.info(summary.line())
        return summary

    def _check_place(self, rows: Rows) -> None:
        """The cache folder must be empty or a cache, and hold none of what the build reads."""
        from ..outputs import CACHE, claim, image_folders, inputs_of

        inputs = inputs_of({"the data": rows.source, "an image folder of the data": image_folders(rows.images),
                            "the packed store": getattr(self.reader, "folder", None),
                            "the teacher": [getattr(self.teacher, "path", None), getattr(self.teacher, "name", None)]})
        claim(self.dir, "a teacher cache", inputs, key="cache folder", same=(CACHE,))

    def _check_writable(self) -> None:
        """Fail before any encoding when the folder cannot be written (a read-only disk, a typo)."""
        try:
            for sub in ("", *KINDS):
                d = self.dir / sub
                d.mkdir(parents=True, exist_ok=True)
                probe = d / f".write-test-{os.getpid()}.tmp"
                probe.write_bytes(b"")
                probe.unlink()
        except OSError as e:
            raise CacheError(f"{self.dir}: cannot write the cache there ({e.strerror or e}); choose a writable "
                             "folder") from None

    def plan_images(self, rows: Rows, build: str | None = None) -> ImagePlan:
        """Images the cache lacks, cut into numbered shards (number, start, end) before anything runs:
        the same cut on every process and after every restart, which makes resumed and split builds
        identical to a plain one."""
        from .keys import KeyIndex

        build = build or build_key_of(self.dir)
        paths = list(dict.fromkeys(p for p in rows.images if p))  # unique, first-seen order
        index = KeyIndex(recorded_paths(self.dir))
        keys, located = image_keys(paths, index, progress=self.progress)
        done, first_shard = done_keys(self.dir, "images", build)
        pending, seen = [], set()
        for p, k, loc in zip(paths, keys, located):
            if k not in done and k not in seen:  # the same picture under two paths is encoded once
                seen.add(k)
                pending.append((p, k, loc))
        shards = [(first_shard + j, s0, min(s0 + self.shard_size, len(pending)))
                  for j, s0 in enumerate(range(0, len(pending), self.shard_size))]
        return ImagePlan([p for p, _, _ in pending], [k for _, k, _ in pending], [x for _, _, x in pending], shards)

    def encode_images(self, plan: ImagePlan, manifest: dict[str, Any], on_shard=None, rank: int = 0,
                      world: int = 1) -> int:
        """Encode and write this process's share (every ``world``-th shard) of an image plan."""
        shards = plan.shards[rank::world]
        if not shards:
            return 0
        policy = manifest["view_policy"]
        ds = _ViewDataset(plan.paths, plan.keys, self.teacher.preprocess, policy, self.reader)
        batches = [list(range(b, min(b + self.batch_size, e))) for _, s0, e in shards
                   for b in range(s0, e, self.batch_size)]  # batches never cross a shard boundary
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=_collate,
                                             num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        bar = _bar(sum(e - s0 for _, s0, e in shards) * policy["views"], "cache images", self.progress, unit="view")
        dtype = DTYPES[self.dtype]
        emb, vws, rows, skipped, encoded = [], [], [], [], 0
        current = iter(shards)
        shard_no, _, shard_end = next(current)
        for batch in loader:
            for i, error in batch["errors"].items():
                skipped.append({"id": plan.keys[i], "image": plan.paths[i], "reason": error})
            if batch["ok"]:
                z = self._encode_images(batch["pixels"]).view(len(batch["ok"]), policy["views"], -1)
                if not torch.isfinite(z).all():
                    bad = batch["ok"][int((~torch.isfinite(z)).flatten(1).any(1).nonzero()[0])]
                    raise CacheError(f"the teacher returned NaN/inf for {plan.paths[bad]}; nothing of this shard was "
                                     "written. Check the teacher's weights (and train.precision / amp on this GPU)")
                emb.append(z.numpy().astype(dtype))
                vws.extend(batch["views"])
                rows.extend(batch["ok"])
                encoded += len(batch["ok"])
            bar.update(len(batch["index"]) * policy["views"])
            if batch["index"][-1] + 1 == shard_end:
                self._write_image_shard(shard_no, emb, vws, rows, skipped, plan, manifest)
                if on_shard:
                    on_shard("images", shard_no)
                emb, vws, rows, skipped = [], [], [], []
                shard_no, _, shard_end = next(current, (None, None, None))
        bar.close()
        return encoded

    @torch.no_grad()
    def _encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = normalize(pixels.to(self.device, non_blocking=True), self.teacher.preprocess)
        with _autocast(self.device, self.amp):
            return self.teacher.encode_image(pixels).float().cpu()

    def _write_image_shard(self, n, emb, vws, rows, skipped, plan: ImagePlan, manifest) -> None:
        d = self.teacher.embed_dim
        k = manifest["view_policy"]["views"]
        arr = np.concatenate(emb) if emb else np.zeros((0, k, d), DTYPES[self.dtype])
        views = np.stack(vws).astype(np.float32) if vws else np.zeros((0, k, 5), np.float32)
        base = self.dir / "images" / f"shard_{n:05d}"
        sha = {"emb": _save(base.with_suffix(".npy"), arr), "views": _save(base.parent / f"{base.name}.views.npy", views)}
        write_json(base.with_suffix(".json"), {
            "rows": len(rows), "ids": [plan.keys[i] for i in rows], "paths": [plan.located[i][0] for i in rows],
            "stat": [list(plan.located[i][1]) if plan.located[i][1] else [0, 0] for i in rows],
            "skipped": skipped, "build": manifest["build"], "built_with": build_fields(manifest), "sha256": sha})

    def plan_texts(self, rows: Rows, build: str | None = None) -> tuple[list[tuple[str, str]], list[tuple[int, int]]]:
        """Captions the cache lacks, cut into numbered shards (number, start)."""
        texts = rows.teacher_texts if rows.teacher_texts is not None else rows.captions
        captions = list(dict.fromkeys(c for c in texts if c is not None))
        done, first_shard = done_keys(self.dir, "texts", build or build_key_of(self.dir))
        pending = [(c, text_key(c)) for c in captions if text_key(c) not in done]
        return pending, [(first_shard + j, s0) for j, s0 in enumerate(range(0, len(pending), self.shard_size))]

    def encode_texts(self, plan, manifest: dict[str, Any], on_shard=None, rank: int = 0, world: int = 1) -> int:
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
                if not torch.isfinite(z).all():
                    raise CacheError("the teacher returned NaN/inf for a caption; nothing of this shard was written. "
                                     "Check the teacher's weights")
                emb.append(z.float().cpu().numpy().astype(DTYPES[self.dtype]))
                bar.update(len(order[b:b + self.batch_size]))
            arr = np.zeros((len(good), self.teacher.embed_dim), DTYPES[self.dtype])
            if emb:
                arr[order] = np.concatenate(emb)
            base = self.dir / "texts" / f"shard_{next_shard:05d}"
            sha = {"emb": _save(base.with_suffix(".npy"), arr)}
            write_json(base.with_suffix(".json"), {"rows": len(good), "ids": [k for _, k in good], "skipped": skipped,
                                                   "build": manifest["build"], "built_with": build_fields(manifest),
                                                   "sha256": sha})
            if on_shard:
                on_shard("texts", next_shard)
            encoded += len(good)
        bar.close()
        return encoded

def _save(path: Path, array: np.ndarray) -> str:
    data = _np_bytes(array)
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _check_policy(views: int, scale: Sequence[float], ratio: Sequence[float]) -> None:
    if not isinstance(views, int) or isinstance(views, bool) or views < 1:
        raise CacheError(f"views={views!r}: must be an integer >= 1 (view 0 is the teacher's eval transform)")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise CacheError(f"scale={tuple(scale)}: must be two area fractions 0 < low <= high <= 1")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
        raise CacheError(f"ratio={tuple(ratio)}: must be two aspect ratios 0 < low <= high")


def _process():
    """(rank, world, device): from accelerate when launched distributed, else one process."""
    from .. import dist

    state = dist.state()
    if state is not None:
        return state.process_index, state.num_processes, state.device
    return 0, 1, None


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _autocast(device: torch.device, enabled: bool):
    if device.type == "cuda" and enabled:
        from ..precision import amp_dtype

        return torch.autocast("cuda", dtype=amp_dtype(device))
    return torch.autocast(device.type, enabled=False)


def _bar(total: int, desc: str, enabled: bool, unit: str):
    from ..progress import progress

    return progress(total, desc, unit, enabled=enabled and total > 0)


__all__ = ["TeacherService", "BuildSummary", "view_for", "MIN_SIDE"]
