"""Issue 16: several processes, one result. Real processes through ``torch.distributed.run`` (torchrun)
with gloo on this CPU: 2 processes x micro-batch 8 against 1 process x 16. Select with
``pytest -m multiprocess``."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytestmark = pytest.mark.multiprocess

STEPS = 24


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch(args: list[str], procs: int = 2, timeout: int = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", _port(),
           *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def _start_until_first_checkpoint(args: list[str], run: Path, **popen) -> subprocess.Popen:
    """Start a two-process fit in the background; return once its first checkpoint is on disk."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), *args]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)
    deadline = time.time() + 180
    while not (run / "checkpoints" / "step_00000004" / "state.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shapes):
    """A saved teacher, a cache of the shapes data built by one process, and a recipe that trains from it."""
    from conftest import TINY_VIT
    from distill import create_student
    from distill.cache import TeacherService
    from distill.teachers import load_teacher

    root = tmp_path_factory.mktemp("mp")
    torch.manual_seed(0)
    model = create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": TINY_VIT},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    model.save(root / "teacher")
    teacher = load_teacher(str(root / "teacher"))
    TeacherService(teacher, root / "cache", shard_size=48, batch_size=32, num_workers=0, progress=False).build(
        str(shapes / "train.csv"), views=2)
    recipe = {
        "student": {"name": "vit_tiny", "kwargs": {"image_size": 32, "model_kwargs": TINY_VIT}},
        "data": {"train": str(shapes / "train.csv"), "num_workers": 0},
        "cache": {"dir": str(root / "cache")},
        "loss": {"weights": {"cosine": 1.0, "contrastive": 1.0, "affinity": 0.5},
                 "kwargs": {"contrastive": {"queue": 32}}},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "train": {"max_steps": STEPS, "progress": False, "health_every": 0, "log_every": 1, "seed": 3,
                  "checkpoint_every": 4, "dist_timeout": 60},
    }
    (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return root


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "log.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    from distill.io import load_tensors

    return load_tensors(run / "student" / "model.safetensors")


@pytest.fixture(scope="module")
def two_processes(setup):
    out = setup / "two"
    p = _launch(["-m", "distill.cli", "fit", str(setup / "recipe.yaml"), f"train.output_dir={out}",
                 "train.batch_size=8"])
    assert p.returncode == 0, p.stderr[-3000:]
    return out


def test_two_processes_at_8_equal_one_process_at_16(setup, two_processes):
    from distill.cli import main

    one = setup / "one"
    assert main(["fit", str(setup / "recipe.yaml"), f"train.output_dir={one}", "train.batch_size=16"]) == 0
    a, b = _losses(one), _losses(two_processes)
    assert len(a) == len(b) == STEPS
    # float sums in another order (gathered columns, averaged gradients): agreement to rounding, not bits
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-4)
    wa, wb = _weights(one), _weights(two_processes)
    worst = max(float((wa[k] - wb[k]).abs().max()) for k in wa)
    # 24 AdamW steps at lr 3e-3 from the same start: rounding-level gradient differences stay below one step's
    # size (AdamW moves a weight by up to lr = 3e-3 per step), so 3e-4 separates "same run" from "another run"
    # by 10x (measured here: 7e-5; AdamW's normalisation amplifies rounding in near-zero gradients)
    assert worst < 3e-4, worst
    print(f"\n2x8 vs 1x16: max |loss difference| {np.abs(np.subtract(a, b)).max():.2e}, max |weight difference| {worst:.2e}")


def test_cache_build_with_two_processes_equals_one(setup, shapes, tmp_path):
    from distill.cache import TeacherService
    from distill.teachers import load_teacher

    common = ["--teacher", str(setup / "teacher"), "--data", str(shapes / "train.csv"), "--views", "3",
              "--shard-size", "24", "--batch-size", "16", "--workers", "0"]
    p = _launch(["-m", "distill.cli", "cache", "build", *common, "--out", str(tmp_path / "two")])
    assert p.returncode == 0, p.stderr[-3000:]
    TeacherService(load_teacher(str(setup / "teacher")), tmp_path / "one", shard_size=24, batch_size=16,
                   num_workers=0, progress=False).build(str(shapes / "train.csv"), views=3)
    files = sorted(f.relative_to(tmp_path / "one") for f in (tmp_path / "one").rglob("shard_*"))
    assert len([f for f in files if f.parts[0] == "images"]) == 7 * 3  # 160 images in shards of 24
    assert len([f for f in files if f.parts[0] == "texts"]) >= 2 * 2  # and the captions: both processes wrote
    for f in files:
        assert (tmp_path / "two" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    ma, mb = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("one", "two"))
    assert ma["fingerprint"] == mb["fingerprint"] and ma["shards"] == mb["shards"] and mb["complete"]


_NAN_ON_RANK_1 = """
import sys, torch
from distill import dist
from distill.cli import main
from distill.trainer import DistillStep

loss_of = DistillStep.loss_of  # the step's loss (train_step calls embed, then loss_of)
calls = [0]

def poisoned(self, e):
    loss, terms = loss_of(self, e)
    calls[0] += 1
    if dist.rank() == 1 and calls[0] == 3:
        loss = loss * float("nan")
    return loss, terms

DistillStep.loss_of = poisoned
sys.exit(main(sys.argv[1:]))
"""


def test_a_nan_on_one_process_stops_both_with_the_message(setup, tmp_path):
    script = tmp_path / "nan.py"
    script.write_text(_NAN_ON_RANK_1)
    tic = time.perf_counter()
    p = _launch([str(script), "fit", str(setup / "recipe.yaml"), f"train.output_dir={tmp_path / 'run'}",
                 "train.batch_size=8"], timeout=120)
    elapsed = time.perf_counter() - tic
    assert p.returncode != 0 and elapsed < 90
    # both processes stop, each with the one-line message (two processes' stderr may still interleave)
    messages = re.findall(r"distill fit: error: (.*?\(process \d of 2\))", p.stderr)
    assert len(messages) == 2, p.stderr[-3000:]
    assert all("loss is nan at step 3" in m and m.endswith("(process 1 of 2)") for m in messages)
    # no traceback from our processes (torchrun itself reports a failed worker with its own traceback)
    frames = [x for x in p.stderr.splitlines() if x.strip().startswith("File ")]
    assert not [f for f in frames if "/distill/" in f], p.stderr


def test_killed_and_resumed_two_process_run_equals_an_uninterrupted_one(setup, two_processes, tmp_path):
    run = tmp_path / "cut"
    proc = _start_until_first_checkpoint(["-m", "distill.cli", "fit", str(setup / "recipe.yaml"),
                                           f"train.output_dir={run}", "train.batch_size=8"], run,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers, as a node crash would
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert f"step_{STEPS:08d}" not in done and not (run / "student").exists()  # it really was cut short
    p = _launch(["-m", "distill.cli", "fit", str(setup / "recipe.yaml"), f"train.output_dir={run}",
                 "train.batch_size=8", "train.resume=true"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(run) == _losses(two_processes)
    wa, wb = _weights(run), _weights(two_processes)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# -- issue 31: several processes stop together ----------------------------------------------------------------
_FAULTS = r'''
import errno, os, sys, torch
from distill import dist
from distill.cli import main

fault, at = os.environ["FAULT"], int(os.environ.get("FAULT_AT", "6"))
victim = int(os.environ.get("FAULT_RANK", "1"))
calls = [0]


def mine():
    return dist.rank() == victim


if fault == "backward_oom":  # an out-of-memory error deep in the student's backward, on one process
    from distill.trainer import DistillStep

    class _Bomb(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    embed = DistillStep.embed

    def bombed(self, batch):
        e = embed(self, batch)
        calls[0] += 1
        if mine() and calls[0] == at:
            e.s_img = _Bomb.apply(e.s_img)
        return e

    DistillStep.embed = bombed
elif fault == "hook":  # a hook of the main process fails (the health check's image was deleted)
    from distill.loop import TrainLoop

    run = TrainLoop.run

    def with_hook(self):
        def hook(step):
            if step == at:
                raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/held_out/0001.jpg")
        self.hooks = [*self.hooks, hook]
        return run(self)

    TrainLoop.run = with_hook
elif fault == "disk_full":  # the main process cannot write a checkpoint: the disk is full
    from distill import checkpoint

    write = checkpoint.write_json

    def full(path, obj):
        if path.name == "state.json" and obj.get("step") == at:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(path, obj)

    checkpoint.write_json = full
elif fault == "encode":  # one process fails while it encodes its shards of a cache
    from distill.cache.build import TeacherService

    encode = TeacherService._encode_images

    def failing(self, pixels):
        calls[0] += 1
        if mine() and calls[0] == at:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return encode(self, pixels)

    TeacherService._encode_images = failing
elif fault == "unreadable":  # every image of one micro-batch is unreadable, on one process only
    from distill.cache.dataset import CachedPairDataset

    getitem = CachedPairDataset.__getitem__

    def broken(self, key):
        calls[0] += 1
        if mine() and at * 8 < calls[0] <= (at + 1) * 8:
            return {"index": int(key) % len(self), "skip": "corrupt or truncated image (OSError: broken data stream)"}
        return getitem(self, key)

    CachedPairDataset.__getitem__ = broken
sys.exit(main(sys.argv[1:]))
'''


def _faulty(setup, tmp_path, fault: str, args: list[str], at: int = 6, rank: int = 1, timeout: int = 90):
    script = tmp_path / "faults.py"
    script.write_text(_FAULTS)
    env = {"FAULT": fault, "FAULT_AT": str(at), "FAULT_RANK": str(rank)}
    return _launch([str(script), *args], timeout=timeout, env=env)


def _lines(p) -> list[str]:
    """The one-line messages the processes printed (no traceback from our code)."""
    frames = [x for x in p.stderr.splitlines() if x.strip().startswith("File ") and "/distill/" in x]
    assert not frames, p.stderr[-3000:]
    return re.findall(r"distill \w+: error: (.*)", p.stderr)


def _fit(setup, run, *extra):
    return ["fit", str(setup / "recipe.yaml"), f"train.output_dir={run}", "train.batch_size=8", *extra]


@pytest.mark.parametrize("fault,rank,says", [
    ("backward_oom", 1, "out of memory"),
    ("backward_oom", 0, "out of memory"),
    ("hook", 0, "No such file or directory (/data/held_out/0001.jpg)"),
    ("disk_full", 0, "no space left on the disk"),
])
def test_a_failure_on_one_process_stops_both_and_resume_continues_exactly(setup, two_processes, tmp_path, fault,
                                                                         rank, says):
    run = tmp_path / "run"
    p = _faulty(setup, tmp_path, fault, _fit(setup, run), at=6 if fault != "disk_full" else 8, rank=rank)
    assert p.returncode != 0
    lines = _lines(p)
    assert len(lines) == 2, p.stderr[-3000:]  # each process says why it stopped, in one line
    own = [x for x in lines if x.endswith(f"(process {rank} of 2)") and not x.startswith("stopped because")]
    other = [x for x in lines if x.startswith("stopped because another process failed")]
    assert len(own) == 1 and len(other) == 1 and says in own[0] and says in other[0], lines
    assert other[0].endswith(f"(process {rank} of 2)")
    steps = sorted(x.name for x in (run / "checkpoints").iterdir())
    assert steps == ["step_00000004"], steps  # the failed checkpoint is absent, not half-written
    assert not (run / "student").exists()
    p = _launch(["-m", "distill.cli", *_fit(setup, run, "train.resume=true")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert _losses(run) == _losses(two_processes)
    wa, wb = _weights(run), _weights(two_processes)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_cache_encode_error_on_one_process_stops_both_and_leaves_the_cache_unfinished(setup, shapes, tmp_path):
    from distill.cache import TeacherService
    from distill.teachers import load_teacher

    common = ["cache", "build", "--teacher", str(setup / "teacher"), "--data", str(shapes / "train.csv"), "--views",
              "2", "--shard-size", "24", "--batch-size", "8", "--workers", "0"]
    p = _faulty(setup, tmp_path, "encode", [*common, "--out", str(tmp_path / "c")], at=3)
    assert p.returncode != 0
    lines = _lines(p)
    assert len(lines) == 2 and all("out of memory" in x for x in lines), p.stderr[-3000:]
    assert not json.loads((tmp_path / "c" / "manifest.json").read_text())["complete"]
    p = _launch(["-m", "distill.cli", *common, "--out", str(tmp_path / "c")])  # the build resumes
    assert p.returncode == 0, p.stderr[-3000:]
    TeacherService(load_teacher(str(setup / "teacher")), tmp_path / "one", shard_size=24, batch_size=8,
                   num_workers=0, progress=False).build(str(shapes / "train.csv"), views=2)
    # the same embeddings for every image and caption (the resumed shards are numbered after the finished ones)
    from distill.cache import EmbeddingCache

    a, b = EmbeddingCache.open(tmp_path / "c"), EmbeddingCache.open(tmp_path / "one")
    assert a.manifest["fingerprint"] == b.manifest["fingerprint"] and set(a.image_index) == set(b.image_index)
    keys = sorted(b.image_index)
    for v in range(2):
        assert torch.equal(a.image_embeddings(keys, [v] * len(keys)), b.image_embeddings(keys, [v] * len(keys)))
    texts = sorted(b.text_index)
    assert torch.equal(a.text_embeddings(texts), b.text_embeddings(texts))


def test_a_micro_batch_unreadable_on_one_process_is_fetched_again_by_both(setup, tmp_path):
    run = tmp_path / "run"
    p = _faulty(setup, tmp_path, "unreadable", _fit(setup, run), at=2)
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(_losses(run)) == STEPS  # every step ran, with the collectives in step
    skipped = [json.loads(x) for x in (run / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 8 and all("broken data stream" in x["reason"] for x in skipped)
    state = json.loads((run / "checkpoints" / f"step_{STEPS:08d}" / "state.json").read_text())
    assert state["consumed"] == STEPS + 1  # one round of batches fetched again, by both processes


def test_a_killed_process_stops_the_other_with_a_message(setup, tmp_path):
    import psutil

    run = tmp_path / "run"
    proc = _start_until_first_checkpoint(["-m", "distill.cli", *_fit(setup, run, "train.dist_timeout=30",
                                                                     "train.max_steps=400")], run,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "distill.cli" in " ".join(c.cmdline())]
    victim = next(w for w in workers if w.environ().get("RANK") == "1")
    victim.kill()  # SIGKILL mid-step, as the kernel's out-of-memory killer would
    _, err = proc.communicate(timeout=60)  # the survivor stops well within train.dist_timeout
    assert proc.returncode != 0
    lines = re.findall(r"distill fit: error: (.*)", err)
    assert len(lines) == 1 and "process 1 of 2" in lines[0] and ("stopped answering" in lines[0]
                                                                 or "ended" in lines[0]), err[-3000:]


_DROPOUT = {"student": {"name": "bert_small", "kwargs": {"hidden_size": 32, "num_layers": 2, "num_heads": 2,
                                                          "context_length": 16}},
            "loss": {"weights": {"cosine": 1.0, "contrastive": 1.0}}}


def test_a_resumed_two_process_run_with_dropout_equals_the_uninterrupted_one(setup, tmp_path):
    """Each process's own random state (dropout masks) is checkpointed and restored."""
    recipe = yaml.safe_load((setup / "recipe.yaml").read_text())
    recipe.update(_DROPOUT)
    recipe["loss"]["kwargs"] = {}
    (tmp_path / "text.yaml").write_text(yaml.safe_dump(recipe))
    args = ["fit", str(tmp_path / "text.yaml"), "train.batch_size=8", "train.max_steps=8"]
    whole = _launch(["-m", "distill.cli", *args, f"train.output_dir={tmp_path / 'whole'}"])
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = _faulty(setup, tmp_path, "hook", [*args, f"train.output_dir={tmp_path / 'cut'}"], at=6, rank=0)
    assert cut.returncode != 0 and (tmp_path / "cut" / "checkpoints" / "step_00000004").is_dir()
    rest = _launch(["-m", "distill.cli", *args, f"train.output_dir={tmp_path / 'cut'}", "train.resume=true"])
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert _losses(tmp_path / "cut") == _losses(tmp_path / "whole")
    wa, wb = _weights(tmp_path / "cut"), _weights(tmp_path / "whole")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
