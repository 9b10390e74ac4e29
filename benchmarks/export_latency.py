"""Batch-1 latency and throughput of PyTorch FP32 vs ONNX FP32 vs ONNX INT8 on this CPU, with parity.

    python benchmarks/export_latency.py [--threads 2] [--batch 32] [--out benchmarks/results]

Students are randomly initialised (no hub here) at their deployment size: vit_tiny and resnet18 at
224 px, mobilevit_s at 256 px, bert_small on real captions (flickr1k when ../shared/assets is there,
else built-in sentences). Parity (mean cosine to PyTorch) is measured on real photos when available.
"""
from __future__ import annotations

import argparse
import csv
import sys
import tempfile
import time
from pathlib import Path

import torch

from distill import create_student
from distill.data import Rows
from distill.export import CALIBRATION_TEXTS, export
from distill.runtime import OnnxStudent

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
STUDENTS = {"vit_tiny": {}, "resnet18": {}, "mobilevit_s": {}, "bert_small": {}}


def timed(fn, iters: int) -> float:
    fn()  # warm-up
    tic = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - tic) / iters


def calibration_rows(assets: Path, n: int = 64) -> Rows | None:
    caps = assets / "flickr1k" / "captions.csv"
    if not caps.exists():
        return None
    with open(caps, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: n * 5: 5]  # one caption per photo
    return Rows([str(caps.parent / r["image"]) for r in rows], [r["caption"] for r in rows], source=str(caps))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = calibration_rows(Path(args.assets))
    texts = [c for c in data.captions] if data is not None else list(CALIBRATION_TEXTS) * 3
    results = []
    print(f"{'student':12} {'runtime':10} {'size MB':>8} {'b1 ms':>7} {f'b{args.batch}/s':>8} {'cosine':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for name in STUDENTS:
            torch.manual_seed(0)
            student = create_student(name, embed_dim=512).eval()
            tower = "text" if student.image is None else "image"
            if tower == "image":
                s = student.preprocess.image_size
                x1, xb = torch.randn(1, 3, s, s), torch.randn(args.batch, 3, s, s)
                torch_fns = (lambda: student.encode_image(x1), lambda: student.encode_image(xb))
            else:
                t1, tb = student.tokenize(texts[:1]), student.tokenize((texts * 4)[: args.batch])
                torch_fns = (lambda: student.encode_text(t1), lambda: student.encode_text(tb))
            with torch.no_grad():
                b1, bb = timed(torch_fns[0], args.iters), timed(torch_fns[1], max(3, args.iters // 4))
            rows = [{"student": name, "runtime": "pytorch-fp32", "size_mb": student.num_params() * 4 / 1e6,
                     "latency_ms_b1": b1 * 1000, "per_s": args.batch / bb, "mean_cosine": 1.0}]
            for fmt in ("onnx", "onnx-int8"):
                res = export(student, Path(tmp) / f"{name}_{fmt}", fmt, data=data, gate=False)
                m = OnnxStudent(res.path, threads=args.threads)
                if tower == "image":
                    f1, fb = (lambda: m.encode_image(x1.numpy())), (lambda: m.encode_image(xb.numpy(), args.batch))
                else:
                    batch = (texts * 4)[: args.batch]
                    f1, fb = (lambda: m.encode_text(texts[:1])), (lambda: m.encode_text(batch, args.batch))
                b1, bb = timed(f1, args.iters), timed(fb, max(3, args.iters // 4))
                size = sum(v for k, v in res.files.items() if k.endswith(".onnx"))
                rows.append({"student": name, "runtime": fmt, "size_mb": size / 1e6, "latency_ms_b1": b1 * 1000,
                             "per_s": args.batch / bb, "mean_cosine": res.parity[tower]["mean_cosine"],
                             "min_cosine": res.parity[tower]["min_cosine"]})
            for r in rows:
                print(f"{r['student']:12} {r['runtime']:10} {r['size_mb']:8.1f} {r['latency_ms_b1']:7.2f} "
                      f"{r['per_s']:8.1f} {r['mean_cosine']:8.5f}")
            results += rows
    write_result("export_latency", torch.device("cpu"), args.out, ("onnxruntime", "timm", "transformers"),
                 threads=args.threads, batch=args.batch,
                 parity_data="flickr1k photos" if data is not None else "generated", results=results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
