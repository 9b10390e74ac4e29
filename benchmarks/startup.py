"""Start-up: how long a run takes to its first step as the data grows (issue 31).

CIFAR-10 training photos (../shared/assets/cifar10-train.tar.gz, 32 px JPEGs, captions "a photo of a
{class}") at 1k, 10k and 50k images; a small saved teacher. For each size: the wall time of a one-step
``distill fit`` (process start, imports, the data, the cache or teacher, the output folder, one step, the
saved student): from a teacher cache with 1 and 2 processes (torchrun, gloo), and with the online teacher,
the first time (every image hashed once) and again (the keys are kept: only a stat per file). Cache
builds are not timed. Prints a table and writes results/startup_<device>.json.

    python benchmarks/startup.py                 # 1k, 10k, 50k
    python benchmarks/startup.py --sizes 1000 5000
"""
from __future__ import annotations

import argparse
import csv
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def photos(work: Path) -> list[tuple[str, str]]:
    """(path, caption) of the CIFAR-10 training photos, classes interleaved (any prefix is balanced)."""
    root = work / "cifar"
    if not (root / "train").is_dir():
        with tarfile.open(ASSETS / "cifar10-train.tar.gz") as tar:
            tar.extractall(root, filter="data")
    by_class = {d.name: sorted(d.iterdir()) for d in sorted((root / "train").iterdir())}
    rows = []
    for k in range(max(len(v) for v in by_class.values())):
        rows += [(str(files[k]), f"a photo of a {name}") for name, files in by_class.items() if k < len(files)]
    return rows


def fit_seconds(recipe: Path, out: Path, procs: int, env: dict) -> float:
    fit = ["-m", "distill.cli", "fit", str(recipe), f"train.output_dir={out}"]
    cmd = [sys.executable, *fit] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port", _port(), *fit]
    tic = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(p.stderr[-3000:])
    return time.perf_counter() - tic


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    if not (ASSETS / "cifar10-train.tar.gz").exists():
        raise SystemExit(f"needs {ASSETS / 'cifar10-train.tar.gz'}")
    from distill import create_student, load_teacher
    from distill.cache import TeacherService

    work = Path(args.work or tempfile.mkdtemp(prefix="startup_"))
    rows = photos(work)
    torch.manual_seed(0)
    vit = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}
    if not (work / "teacher").exists():
        create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": vit},
                       text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval().save(work / "teacher")
    teacher = load_teacher(str(work / "teacher"))
    keys = work / "keys"  # the kept image keys of online runs (CLIP_DISTILL_CACHE): empty before the first start
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "CLIP_DISTILL_CACHE": str(keys), "DISTILL_PROGRESS": "off"}
    table = []
    for n in args.sizes:
        data = work / f"data_{n}.csv"
        with open(data, "w", newline="") as f:
            csv.writer(f).writerows([("image", "caption"), *rows[:n]])
        cache = work / f"cache_{n}"
        if not (cache / "manifest.json").exists():
            TeacherService(teacher, cache, num_workers=2, progress=False).build(str(data))
        base = {"student": {"name": "vit_tiny", "kwargs": {"image_size": 32, "model_kwargs": vit}},
                "data": {"train": str(data), "num_workers": 0},
                "train": {"max_steps": 1, "batch_size": 32, "progress": False, "health_every": 0}}
        cached = {**base, "cache": {"dir": str(cache)}}
        online = {**base, "teacher": {"name": str(work / "teacher")}}
        for name, recipe in (("cached", cached), ("online", online)):
            (work / f"{name}_{n}.yaml").write_text(yaml.safe_dump(recipe))
        row = {"images": n}
        for procs in (1, 2):
            row[f"cached_{procs}p_s"] = fit_seconds(work / f"cached_{n}.yaml", work / f"run_c{procs}_{n}", procs, env)
        row["online_first_s"] = fit_seconds(work / f"online_{n}.yaml", work / f"run_o1_{n}", 1, env)
        row["online_again_s"] = fit_seconds(work / f"online_{n}.yaml", work / f"run_o2_{n}", 1, env)
        table.append(row)
        print(row, flush=True)
    cols = ["images", "cached_1p_s", "cached_2p_s", "online_first_s", "online_again_s"]
    print("\nseconds to the first step (a one-step fit: process start, imports, data, cache or teacher, one step)")
    print("".join(f"{c:>16}" for c in cols))
    for r in table:
        print("".join(f"{r[c]:>16.1f}" if isinstance(r[c], float) else f"{r[c]:>16d}" for c in cols))
    first, last = table[0], table[-1]
    growth = {c: last[c] / first[c] for c in cols[1:]}
    print(f"data x{last['images'] / first['images']:.0f}: start-up x" +
          ", x".join(f"{growth[c]:.2f} ({c})" for c in cols[1:]))
    write_result("startup", torch.device("cpu"), args.out, ("accelerate",), sizes=args.sizes, rows=table,
                 growth=growth)


if __name__ == "__main__":
    main()
