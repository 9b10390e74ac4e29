"""A run and its output folder: what makes a run this run (``run_identity``), the folder it owns
(``claim_output_dir``: resumed only by the same run, never over another artifact or an input), and what it
records beside its weights: the rows it leaves out (``SkipLog``) and where its time goes (``StepTimes``)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import list_checkpoints
from .config import Recipe
from .data import Rows
from .errors import RunConflictError
from .io import atomic_write_text, read_json

log = logging.getLogger(__name__)
clock = time.perf_counter  # what StepTimes measures with (a test can give it another clock)


@dataclass
class FitResult:
    output_dir: Path
    history: dict[str, list[float]]
    model: nn.Module
    model_dir: Path
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def student(self) -> nn.Module:
        return self.model


# Recipe fields that do not change what a run computes: a resumed run may differ in them.
_NOT_RUN_FIELDS = {
    "train": ("output_dir", "resume", "overwrite", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
              "progress", "health_every", "health_rows", "cpu", "grad_checkpointing", "channels_last", "compile",
              "dist_timeout"),
    "data": ("train", "num_workers"),
    "cache": ("dir", "allow_stale"),
    # where the tower, the LM and a starting adapter lie: their identities (weights digests) are the run's
    "vlm": ("tower", "lm", "gguf_file", "init_adapter"),
}
RUN_FILES = ("log.jsonl", "health.jsonl", "skipped.jsonl", "run.json")
# what a run writes in its output folder (and train.overwrite deletes): no input may live there
RUN_PATHS = (*RUN_FILES, "recipe.yaml", "checkpoints", "student", "model", "adapter", "features")


def data_fingerprint(rows: Rows, image_keys: list[str | None] | None = None, progress: bool = True) -> str:
    """Hash of what a run trains on, row by row: each image's content key (``cache.keys``) and its
    caption. Independent of where the data folder lives (a moved folder still resumes), but not of
    what the images hold: an edited or swapped image makes it another run. ``image_keys``: the rows'
    keys when already known (a cached run), else the images are hashed, each once across runs: their keys are
    kept by real path, size and mtime (``cache.keys.StoredKeys``), so a later start only stats the files."""
    if image_keys is None:
        from .cache.keys import StoredKeys, image_keys as content_keys, locate

        unique = list(dict.fromkeys(p for p in rows.images if p))
        stored = StoredKeys()
        keys, located = content_keys(unique, stored.index([locate(p) for p in unique]), progress=progress)
        stored.add(located, keys)
        by_path = dict(zip(unique, keys))
        image_keys = [by_path[p] if p else None for p in rows.images]
    h = hashlib.sha256()
    for k, c in zip(image_keys, rows.captions):
        h.update(f"{k or ''}\0{c or ''}\n".encode("utf-8"))
    return h.hexdigest()[:20]


def run_identity(recipe: Recipe, **parts: Any) -> dict[str, Any]:
    """What makes a run this run: the recipe fields that change its numbers, plus ``parts`` (teacher
    identity, student config, data fingerprint)."""
    rec, default = _run_fields(recipe.to_dict()), _run_fields(Recipe().to_dict())
    # fields at their default are left out: an option added in a later version does not make every
    # earlier run "another run" (comparisons fill the defaults back in: _with_defaults)
    rec = {s: {k: v for k, v in vals.items() if default.get(s, {}).get(k, _MISSING) != v} for s, vals in rec.items()}
    return {"recipe": rec, **parts}


_MISSING = object()


def provenance(run: dict[str, Any], rows: Rows, held: int, steps: int, source: Any) -> dict[str, Any]:
    """What a saved model records of how it was made (its model card shows it): the recipe fields that made
    the run (``run_identity``), the data by name, size and fingerprint, and the steps. No path of this
    machine: a teacher or data folder by its name only."""
    import datetime

    recipe = {s: dict(v) for s, v in run["recipe"].items() if v}
    recipe.get("teacher", {}).pop("name", None)  # the teacher identity names it
    name = rows.source if isinstance(source, Rows) else source
    return {"recipe": {s: v for s, v in recipe.items() if v},
            "data": {"source": os.path.basename(str(name).rstrip("/")) if name else None, "rows": len(rows),
                     "images": len({p for p in rows.images if p}) if rows.images else 0,
                     "captions": sum(1 for c in rows.captions if c) if rows.captions else 0, "held_out": held,
                     "fingerprint": run.get("data")},
            "steps": steps, "date": datetime.date.today().isoformat()}


def _run_fields(rec: dict[str, Any]) -> dict[str, Any]:
    """A recipe dict without the fields that do not change a run's numbers (_NOT_RUN_FIELDS)."""
    for section, keys in _NOT_RUN_FIELDS.items():
        for k in keys:
            rec.get(section, {}).pop(k, None)
    return rec


def _with_defaults(run: dict[str, Any]) -> dict[str, Any]:
    """A run identity with the recipe's default values filled in (to name what differs)."""
    if not isinstance(run.get("recipe"), dict):
        return run
    default, recorded = _run_fields(Recipe().to_dict()), run["recipe"]
    rec = {s: {**default.get(s, {}), **(recorded.get(s) if isinstance(recorded.get(s), dict) else {})}
           for s in {**default, **recorded}}
    return {**run, "recipe": rec}


def _hash(run: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [f"{path}: {a!r} there vs {b!r} now"]


def recipe_inputs(recipe: Recipe) -> dict[str, str]:
    """``{what: path}`` of every file or folder a recipe names that exists (teacher and student folders and
    weights, tokenizers, data, packed store, cache): what a run reads and must never write over."""
    from .outputs import inputs_of

    return inputs_of({f"what {key} names": value for key, value in (
        ("teacher.name", recipe.teacher.name), ("teacher.pretrained", recipe.teacher.pretrained),
        ("teacher.kwargs", recipe.teacher.kwargs), ("student.name", recipe.student.name),
        ("student.kwargs", recipe.student.kwargs), ("data.train", recipe.data.train),
        ("data.packed", recipe.data.packed), ("cache.dir", recipe.cache.dir))})


def run_inputs(source: Any, rows: Rows, teacher: Any = None, service: Any = None) -> dict[str, str]:
    """``{what: path}`` a run reads beyond its recipe: the data it was given, the folders its images are in,
    the folder of a teacher object and the cache of a teacher service."""
    from .outputs import image_folders, inputs_of

    return inputs_of({"the training data": source if isinstance(source, (str, Path)) else None,
                      "an image folder of the data": image_folders(rows.images),
                      "the teacher": [getattr(teacher, "path", None), getattr(teacher, "name", None)],
                      "the teacher cache": getattr(service, "dir", None)})


def check_output_dir(output_dir: Path, inputs: dict[str, Any], overwrite: bool = False) -> None:
    """Refuse an output folder that holds another kind of artifact (a cache, an export, a saved model), that
    holds one of the run's inputs (unless ``train.overwrite``: the run is written beside it), or where the
    files a run writes (and ``train.overwrite`` deletes) would hold one."""
    from .outputs import RUN, describe, inputs_within, written_by_us

    for name in RUN_PATHS:  # never, not even with train.overwrite
        found = inputs_within(output_dir / name, inputs)
        if found:
            what, path = found[0]
            raise RunConflictError(f"train.output_dir: {output_dir / name} is or holds {what} ({path}), an input of "
                                   f"this run, and a run writes its {name} there: choose another train.output_dir")
    found = inputs_within(output_dir, inputs)
    if found and not overwrite:
        what, path = found[0]
        raise RunConflictError(f"train.output_dir: {output_dir} holds {what} ({path}), an input of this run: choose "
                               "another train.output_dir, or train.overwrite=true to write the run beside it (the "
                               "input is left as it is)")
    held = describe(output_dir)
    if held != RUN and written_by_us(held):
        raise RunConflictError(f"train.output_dir: {output_dir} holds {held}; a run goes into an empty folder or one "
                               "of its own runs: choose another train.output_dir")
    taken = [name for name in RUN_PATHS if (output_dir / name).exists()] if held != RUN else []
    if taken:  # not a run's: a run would write over (with train.overwrite, delete) what someone else put there
        raise RunConflictError(f"train.output_dir: {output_dir} holds {taken[0]}, and no run of clip-distill wrote it "
                               f"(there is no run.json): a run writes its {taken[0]} there; choose another "
                               "train.output_dir")


def claim_output_dir(output_dir: Path, train_cfg, run: dict[str, Any], main: bool = True,
                     inputs: dict[str, Any] | None = None) -> Path | None:
    """Make ``output_dir`` this run's: returns the checkpoint to resume from (or None to start).

    A folder that holds work (checkpoints, logs, a saved model) is resumed only with ``train.resume``
    and only when its checkpoints record this same run; ``train.overwrite`` deletes that work first.
    A folder holding another kind of artifact, or whose run files would hold one of ``inputs``, is
    refused (``check_output_dir``). Anything else stops with RunConflictError, naming what differs.
    Only the main process writes."""
    check_output_dir(output_dir, inputs or {}, train_cfg.overwrite)
    root = output_dir / "checkpoints"
    ckpts = list_checkpoints(root)
    work = [output_dir / f for f in RUN_FILES[:1] if (output_dir / f).exists()] + ckpts
    for model, weights in (("student", "model.safetensors"), ("model", "model.safetensors"),
                           ("adapter", "adapter.safetensors")):
        if (output_dir / model / weights).exists():
            work.append(output_dir / model)
    rid = _hash(run)
    if train_cfg.overwrite and (work or root.exists()):
        if main:
            log.warning("train.overwrite: deleting the previous run in %s", output_dir)
            for f in RUN_FILES:
                (output_dir / f).unlink(missing_ok=True)
            for d in (root, output_dir / "student", output_dir / "model", output_dir / "adapter"):  # features/: keyed
                shutil.rmtree(d, ignore_errors=True)
        ckpts, work = [], []
    if not work:
        return None
    if not train_cfg.resume:
        what = f"checkpoints up to step {ckpts[-1].name.split('_')[-1].lstrip('0') or 0}" if ckpts else \
            "the logs or model of an earlier run"
        raise RunConflictError(f"{output_dir} already holds {what}; add train.resume=true to continue that run, "
                               "train.overwrite=true to delete it and start again, or choose another train.output_dir")
    if not ckpts:  # logs of a run that died before its first checkpoint: start it again
        _check_same_run(output_dir, run, rid, None)
        if main:
            for f in RUN_FILES[:3]:
                (output_dir / f).unlink(missing_ok=True)
        return None
    _check_same_run(output_dir, run, rid, read_json(ckpts[-1] / "state.json").get("run"))
    return ckpts[-1]


def _check_same_run(output_dir: Path, run: dict[str, Any], rid: str, ckpt_rid: str | None) -> None:
    recorded = read_json(output_dir / "run.json") if (output_dir / "run.json").exists() else None
    recorded_id = recorded.get("id") if isinstance(recorded, dict) else None
    if ckpt_rid is not None and recorded_id not in (None, ckpt_rid):
        recorded = None  # run.json is of a later attempt; the checkpoint's own id decides
    theirs = ckpt_rid or recorded_id
    if theirs == rid:
        return
    if theirs is None:
        raise RunConflictError(f"{output_dir} holds checkpoints that record no run (an older clip-distill): they "
                               "cannot be matched to this recipe; use train.overwrite=true or another train.output_dir")
    diff = _differences(_with_defaults(recorded["run"]), _with_defaults(run)) if recorded and "run" in recorded else []
    diff = ["data: the rows differ (an image's content, a caption, or which rows there are)" if d.startswith("data:")
            else d for d in diff]
    detail = "; ".join(diff[:4]) + (f"; and {len(diff) - 4} more" if len(diff) > 4 else "") if diff else \
        "recipe, data, teacher or student"
    raise RunConflictError(f"{output_dir} holds checkpoints of another run ({detail}); train.resume continues only "
                           "the same run: use another train.output_dir, or train.overwrite=true to delete that one")


def _truncate_log(path: Path, step: int) -> None:
    """Keep the lines of ``path`` up to ``step``: a resumed run writes the later ones again."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
    atomic_write_text(path, "".join(x + "\n" for x in keep))


class StepTimes:
    """Where a run's wall time goes, in seconds: waiting for the next batch (``data``: loading, decoding,
    crops, cache gathers in the loader), the training step (``step``: forward, loss, backward, optimiser),
    ``log`` (records, progress bar), ``hooks`` (health checks) and ``checkpoint``. ``window`` holds the same
    since the last log line: the live data-wait fraction comes from it."""

    PARTS = ("data", "step", "log", "hooks", "checkpoint")

    def __init__(self):
        self.total = dict.fromkeys(self.PARTS, 0.0)
        self.window = dict.fromkeys(self.PARTS, 0.0)
        self.start = dict.fromkeys(self.PARTS, 0.0)  # totals when the loader had warmed up (``mark``)
        self.start_steps = 0

    def mark(self, steps: int) -> None:
        """Remember where the steady state starts (after the loader's first batches)."""
        self.start, self.start_steps = dict(self.total), steps

    def steady(self) -> dict[str, float]:
        return {k: self.total[k] - self.start[k] for k in self.PARTS}

    @contextmanager
    def __call__(self, part: str):
        t0 = clock()
        try:
            yield
        finally:
            dt = clock() - t0
            self.total[part] += dt
            self.window[part] += dt

    def data_fraction(self, window: bool = True) -> float:
        """Waiting for data as a fraction of data + step time."""
        t = self.window if window else self.total
        return t["data"] / max(t["data"] + t["step"], 1e-9)

    def reset_window(self) -> None:
        self.window = dict.fromkeys(self.PARTS, 0.0)


LOG_FIRST = 10  # skipped rows logged one by one per reason; the rest are counted (and listed in skipped.jsonl)


class SkipLog:
    """Rows a run leaves out: one warning per row (however often it comes round; the first ``LOG_FIRST`` of
    each reason, then one line saying the rest are only counted), one line each in
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

    def _count(self, where: str, reason: str) -> tuple[str, int]:
        """Count a skipped row; its reason's key (the reason without its details) and that key's count."""
        self.seen.add(where)
        key = reason.split(" (")[0]
        self.reasons[key] = self.reasons.get(key, 0) + 1
        return key, self.reasons[key]

    def add(self, rows: Rows, i: int, reason: str) -> None:
        where = rows.where(i)
        if where in self.seen:
            return
        key, n = self._count(where, reason)
        if n <= LOG_FIRST:  # a file with thousands of bad rows must not drown the log: the rest go to the file
            log.warning("skipping %s: %s (%s)", where, reason, rows.images[i] or repr(rows.captions[i]))
        if n == LOG_FIRST:
            log.warning("more rows skipped for %s are not logged one by one%s; the count comes at the end",
                        key, f" (all are listed in {self.path})" if self.write else "")
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
