"""Speed of every registered student: parameters, inference latency (batch 1) and throughput
(batch 64), and training throughput (forward + backward + AdamW step, cosine loss to random
targets) at 224 px / 77 tokens.

    python benchmarks/student_speed.py                 # CPU here, the GPU when there is one
    python benchmarks/student_speed.py --train-batch 256 --precision bf16

Prints a table and writes benchmarks/results/student_speed_<device>.json.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from _results import write_result
from distill import create_student, list_students

WORDS = "a small dog runs across the green grass next to a red ball in the park".split()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timeit(fn, device, iters, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    tic = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - tic) / iters


def _inputs(student, batch, device, tokens=77):
    if student.image is not None:
        s = student.preprocess.image_size
        return {"pixels": torch.randn(batch, 3, s, s, device=device)}
    text = [" ".join(WORDS * 6)[: tokens * 4]] * batch
    return {"text": {k: v.to(device) for k, v in student.tokenize(text).items()}}


def bench(name, device, train_batch, precision, iters):
    kwargs = {"image_size": 224} if name != "bert_small" else {}
    student = create_student(name, embed_dim=512, **kwargs).to(device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    amp = torch.autocast(device.type, dtype=dtype) if dtype else torch.autocast(device.type, enabled=False)
    row = {"student": name, "params_m": student.num_params() / 1e6,
           "input": f"{student.preprocess.image_size}px" if student.image is not None else "77 tokens"}
    student.eval()
    with torch.no_grad(), amp:
        x1, x64 = _inputs(student, 1, device), _inputs(student, 64, device)
        row["latency_b1_ms"] = 1000 * _timeit(lambda: student(**x1), device, iters)
        row["infer_b64_per_s"] = 64 / _timeit(lambda: student(**x64), device, iters)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    xb = _inputs(student, train_batch, device)
    target = F.normalize(torch.randn(train_batch, 512, device=device), dim=-1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step():
        with amp:
            z = next(iter(student(**xb).values()))
            loss = 1 - F.cosine_similarity(z.float(), target).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row["train_per_s"] = train_batch / _timeit(step, device, iters)
    row["train_batch"] = train_batch
    if device.type == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train-batch", type=int, default=None, help="default: 256 on a GPU, 16 on CPU")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"], help="default: bf16 on GPU")
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.train_batch or (256 if gpu else 16)
    precision = args.precision or ("bf16" if gpu else "fp32")
    iters = args.iters or (20 if gpu else 3)
    rows = [bench(n, device, batch, precision, iters) for n in list_students()]
    cols = ["student", "params_m", "input", "latency_b1_ms", "infer_b64_per_s", "train_per_s"] + (["peak_mem_gb"] if gpu else [])
    print(" | ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print(" | ".join(f"{r[c]:>15.2f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols))
    write_result("student_speed", device, args.out, ("timm", "transformers"),
                 precision=precision, train_batch=batch, rows=rows)

if __name__ == "__main__":
    main()
