"""1 process vs 2 processes at the same global batch, on this machine (issue 16).

Trains the same student from the same teacher cache twice through the CLI: one process at micro-batch
B, then ``torchrun --nproc_per_node 2`` at B/2 (gloo on CPUs, NCCL on GPUs). Prints samples/s and the
two loss curves side by side, and writes ``results/multiprocess_<device>.json``. The curves agree to
rounding (the contrastive losses gather every process's teacher references); the speed-up on a 2-core
CPU is small by nature (two processes share two cores), so read it as an honest figure, not a target.

    python benchmarks/multiprocess.py            # 64 px vit_tiny, global batch 64, 60 steps
    python benchmarks/multiprocess.py --quick    # 32 px, 20 steps
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=64, help="global batch (each of 2 processes takes half)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    size, steps = (32, 20) if args.quick else (64, 60)
    steps = args.steps or steps

    from distill import create_student
    from distill.cache import TeacherService
    from distill.demo import make_shapes
    from distill.teachers import load_teacher

    work = Path(tempfile.mkdtemp(prefix="mp_bench_"))
    data = make_shapes(work / "data", n_train=1024, n_test=16, size=size, seed=0)
    torch.manual_seed(0)
    vit = {"patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}
    create_student("vit_tiny+bert_small", embed_dim=128, image_kwargs={"image_size": size, "model_kwargs": vit},
                   text_kwargs={"hidden_size": 64, "num_layers": 2, "num_heads": 2}).eval().save(work / "teacher")
    TeacherService(load_teacher(str(work / "teacher")), work / "cache", num_workers=0, progress=False).build(
        str(data / "train.csv"), views=2)
    recipe = {
        "student": {"name": "vit_tiny", "kwargs": {"image_size": size,
                                                    "model_kwargs": {"patch_size": 8, "embed_dim": 64, "depth": 2,
                                                                     "num_heads": 2}}},
        "data": {"train": str(data / "train.csv"), "num_workers": 0},
        "cache": {"dir": str(work / "cache")},
        "loss": {"weights": {"cosine": 1.0, "contrastive": 1.0}},
        "optim": {"lr": 2e-3, "warmup_steps": 5},
        "train": {"max_steps": steps, "progress": False, "health_every": 0, "log_every": 1, "seed": 0},
    }
    (work / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for procs in (1, 2):
        out = work / f"run{procs}"
        fit = ["-m", "distill.cli", "fit", str(work / "recipe.yaml"), f"train.output_dir={out}",
               f"train.batch_size={args.batch // procs}"]
        cmd = [sys.executable, *fit] if procs == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", _port(), *fit]
        threads = max(1, (os.cpu_count() or 2) // procs)
        tic = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)})
        wall = time.perf_counter() - tic
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
        log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        runs[procs] = {"processes": procs, "micro_batch": args.batch // procs, "threads_per_process": threads,
                       "wall_s": wall, "samples_per_s": steps * args.batch / wall,
                       "loss": [x["loss"] for x in log]}
    diff = max(abs(a - b) for a, b in zip(runs[1]["loss"], runs[2]["loss"]))
    print(f"\nglobal batch {args.batch}, {steps} steps, {size} px vit_tiny from a cache (wall time includes start-up)")
    print(f"{'processes':>9} {'micro-batch':>11} {'threads':>7} {'samples/s':>10} {'final loss':>10}")
    for r in runs.values():
        print(f"{r['processes']:9d} {r['micro_batch']:11d} {r['threads_per_process']:7d} {r['samples_per_s']:10.1f} "
              f"{r['loss'][-1]:10.4f}")
    print(f"max |loss(1 process) - loss(2 processes)| over the steps: {diff:.2e}")
    print("step  1 process  2 processes")
    for k in range(0, steps, max(1, steps // 10)):
        print(f"{k + 1:4d}  {runs[1]['loss'][k]:.5f}    {runs[2]['loss'][k]:.5f}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result("multiprocess", device, args.out, ("accelerate",), quick=args.quick, global_batch=args.batch,
                 steps=steps, image_size=size, max_abs_loss_diff=diff, runs=list(runs.values()))


if __name__ == "__main__":
    main()
