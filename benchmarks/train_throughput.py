"""Training throughput and peak memory: online teacher vs cached teacher vs cached + packed images,
the low-VRAM recipe under an 8 GB cap, and cache builds from packed images.

    python benchmarks/train_throughput.py            # a GPU: 224 px / 77 tokens, batch 256 bf16
    python benchmarks/train_throughput.py --quick    # CPU smoke run: 64 px, batch 16, few steps

For vit_tiny, resnet18, mobilevit_s (images/s) and bert_small (captions/s):
  (a) online teacher (open_clip ViT-B/32 run every step, as open_clip's built-in distillation does),
  (b) cached teacher (TeacherService cache, JPEG decoding), (c) cached teacher + packed images;
  each at the same batch and precision, peak ``torch.cuda.max_memory_allocated``;
  (d) the low-VRAM recipe that ``distill plan --vram 8GB`` picks for an effective batch of 1024, run
  under ``torch.cuda.set_per_process_memory_fraction(8 GiB)``, and the same effective batch
  unconstrained; the cosine-term curves of both are compared.
Teacher weights are random (no hub here): speed and memory do not depend on them. Images are
generated 256x256 JPEGs. Writes benchmarks/results/train_throughput_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402
from cache_throughput import make_images  # noqa: E402

from distill import Distiller, create_student, load_teacher  # noqa: E402
from distill.cache import TeacherService  # noqa: E402
from distill.config import Recipe, apply_options  # noqa: E402
from distill.data.packed import PackedImages, pack_images  # noqa: E402
from distill.plan import make_plan  # noqa: E402

STUDENTS = ("vit_tiny", "resnet18", "mobilevit_s", "bert_small")


def peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_mib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None


def run(teacher, student_name, data, work, device, args, mode, **extra) -> dict:
    torch.manual_seed(0)
    kwargs = {"image_size": args.size} if student_name != "bert_small" else {"context_length": 77}
    if student_name == "mobilevit_s" and not args.quick:
        kwargs["image_size"] = 256
    student = create_student(student_name, embed_dim=512, **kwargs)
    opts = dict(output_dir=str(work / f"{student_name}_{mode}"), max_steps=args.steps, batch_size=args.batch,
                num_workers=args.workers, progress=False, warmup_steps=1, precision=args.precision,
                cpu=device.type == "cpu", health_every=0, lr=5e-4, checkpoint_every=0)
    opts.update(extra)
    peak_reset(device)
    if mode == "online":
        r = Distiller(teacher, student, **opts).fit(data)
    else:
        r = Distiller(None, student, cache=str(work / "cache"), **opts).fit(data)
    return {"per_s": r.extra["samples_per_s"], "peak_mib": peak_mib(device), "history": r.history}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CPU smoke run: 64 px, batch 16, 3 steps")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--students", default=",".join(STUDENTS))
    p.add_argument("--cap-gb", type=float, default=None, help="default 8 (GPU); 0.15 in --quick, so it accumulates")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.quick else "cpu")
    gpu = device.type == "cuda"
    args.size = 64 if args.quick else 224
    args.batch = 16 if args.quick else 256
    args.steps = args.steps or (3 if args.quick else 40)
    args.images = args.images or (64 if args.quick else 8192)
    args.workers = args.workers if args.workers is not None else (0 if args.quick else 16)
    args.precision = "bf16" if gpu else "no"
    args.cap_gb = args.cap_gb or (0.15 if args.quick else 8.0)
    tmp = Path(tempfile.mkdtemp(prefix="train_tp_"))
    data = make_images(tmp / "images", args.images)
    teacher = load_teacher("openclip:ViT-B-32")  # random weights, ViT-B/32 cost (224 px in every mode)
    result = {"size": args.size, "batch": args.batch, "steps": args.steps, "precision": args.precision}

    # packing and cache builds (from JPEGs and from the pack)
    tic = time.perf_counter()
    pack_images(data, tmp / "pack", size=256 if not args.quick else 64, workers=args.workers or 2, progress=False)
    result["pack_images_per_s"] = args.images / (time.perf_counter() - tic)
    builds = {}
    for name, reader in (("jpeg", None), ("packed", PackedImages(tmp / "pack"))):
        svc = TeacherService(teacher, tmp / f"cache_{name}", batch_size=512 if gpu else 32,
                             num_workers=args.workers, progress=False, reader=reader)
        s = svc.build(data)
        builds[name] = s.images_encoded / s.image_seconds
    (tmp / "cache").symlink_to(tmp / "cache_packed")
    result["cache_build_images_per_s"] = builds
    print(f"cache build (ViT-B/32, {device}): {builds['jpeg']:.0f} img/s from JPEGs, {builds['packed']:.0f} from packed")

    rows = []
    for name in args.students.split(","):
        r = {"student": name}
        modes = [("online", {}), ("cached", {})] + ([("cached_packed", {"packed": str(tmp / "pack")})]
                                                   if name != "bert_small" else [])
        for mode, extra in modes:
            out = run(teacher if mode == "online" else None, name, data, tmp, device, args,
                      "online" if mode == "online" else mode, **extra)
            r[mode] = {"per_s": out["per_s"], "peak_mib": out["peak_mib"]}
        r["cached_speedup"] = r["cached"]["per_s"] / r["online"]["per_s"]
        rows.append(r)
        print(f"{name:12} online {r['online']['per_s']:8.0f}/s  cached {r['cached']['per_s']:8.0f}/s  "
              + (f"packed {r['cached_packed']['per_s']:8.0f}/s  " if "cached_packed" in r else "")
              + f"x{r['cached_speedup']:.2f}  peak MiB {[r[m]['peak_mib'] for m, _ in modes]}")
    result["students"] = rows

    # the low-VRAM recipe at an effective batch of 1024 under the cap, vs unconstrained
    low = []
    effective = 64 if args.quick else 1024
    for name in [s for s in args.students.split(",") if s != "bert_small"]:
        recipe = apply_options(Recipe(), {"image_size": args.size if name != "mobilevit_s" or args.quick else 256})
        recipe.student.name = name
        recipe.train.precision = args.precision
        plan = make_plan(recipe, f"{args.cap_gb}GB", str(device), effective)
        settings = dict(batch_size=plan.batch_size, grad_accum=plan.grad_accum,
                        grad_checkpointing=plan.checkpointing, packed=str(tmp / "pack"))
        if gpu:
            torch.cuda.set_per_process_memory_fraction(args.cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
        capped = run(None, name, data, tmp, device, dict_args(args, batch=plan.batch_size), "capped", **settings)
        if gpu:
            torch.cuda.set_per_process_memory_fraction(1.0)
        free = run(None, name, data, tmp, device, dict_args(args, batch=effective), "uncapped", packed=str(tmp / "pack"))
        a, b = np.array(capped["history"]["cosine"]), np.array(free["history"]["cosine"])
        low.append({"student": name, "plan": plan.overrides(), "capped_peak_mib": capped["peak_mib"],
                    "capped_per_s": capped["per_s"], "uncapped_peak_mib": free["peak_mib"],
                    "uncapped_per_s": free["per_s"], "cosine_curve_capped": a.tolist(),
                    "cosine_curve_uncapped": b.tolist(),
                    "curve_max_rel_diff": float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-9)))})
        print(f"{name:12} 8 GB plan: {plan.overrides()}  peak {capped['peak_mib']} MiB  "
              f"curve max rel diff {low[-1]['curve_max_rel_diff']:.3f}")
    result["low_vram"] = low
    write_result("train_throughput", device, args.out, ("timm", "transformers", "accelerate", "open_clip"), **result)
    return 0


def dict_args(args, **changes):
    out = argparse.Namespace(**vars(args))
    for k, v in changes.items():
        setattr(out, k, v)
    return out


if __name__ == "__main__":
    sys.exit(main())
