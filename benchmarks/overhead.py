"""How close does training come to the student's own compute? (issue 19)

For each student, in one run on one machine (ratios, not absolute times):

* ceiling: the student's training step (forward, the same loss, backward, AdamW) on tensors already in
  memory, at the same batch, size and precision;
* ``fit`` from a teacher cache with images from a packed store, from a cache with images from JPEGs,
  and with the online teacher;
* the cache build from a pack and from JPEGs against the teacher's own forward on in-memory tensors.

Each row gives samples/s, the ratio to the ceiling, and where the rest goes, from the training loop's own
timers (``FitResult.extra["timing"]``: waiting for data, the step, logging), measured after the loader's
first batches. A run's one checkpoint (``train.checkpoint_every: 0``) is a fixed cost: it is given in seconds,
not folded into the rate. Real photos: the flickr1k set under ../shared/assets.

    python benchmarks/overhead.py --quick      # 2-core CPU, minutes: small sizes
    python benchmarks/overhead.py              # recipe sizes (224 px, 256 for mobilevit_s, 77 tokens)
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from statistics import median
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
IMAGE_STUDENTS = ("vit_tiny", "resnet18", "mobilevit_s")


def _settings(quick: bool) -> dict:
    if quick:
        return {"sizes": {"vit_tiny": 96, "resnet18": 96, "mobilevit_s": 96}, "context": 32, "batch": 32,
                "steps": 30, "photos": 384, "teacher": "quick", "teacher_size": 96}
    return {"sizes": {"vit_tiny": 224, "resnet18": 224, "mobilevit_s": 256}, "context": 77, "batch": 64,
            "steps": 20, "photos": 1000, "teacher": "ViT-B-32", "teacher_size": 224}


QUICK_TEACHER = {"embed_dim": 256,
                 "vision_cfg": {"image_size": 96, "layers": 6, "width": 384, "patch_size": 16},
                 "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 4}}


def _teacher(cfg):
    from distill import load_teacher

    torch.manual_seed(0)
    if cfg["teacher"] == "quick":
        return load_teacher("openclip:overhead-quick", model_cfg=QUICK_TEACHER)
    return load_teacher("openclip:ViT-B-32")  # random weights: speed is what is measured here


def _data(work: Path, n: int) -> Path:
    """The first ``n`` flickr1k photos with one caption each (a csv of absolute paths)."""
    src = ASSETS / "flickr1k"
    if not (src / "captions.csv").exists():
        raise SystemExit(f"needs the flickr1k photos in {src}")
    seen, rows = set(), []
    with open(src / "captions.csv", newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r["image"] not in seen and len(rows) < n:
                seen.add(r["image"])
                rows.append((str(src / r["image"]), r["caption"]))
    out = work / "pairs.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return out


def _student(name: str, embed_dim: int, cfg):
    from distill import create_student

    torch.manual_seed(0)
    if name == "bert_small":
        return create_student("bert_small", embed_dim=embed_dim, context_length=cfg["context"])
    return create_student(name, embed_dim=embed_dim, image_size=cfg["sizes"][name])


def ceiling(name: str, embed_dim: int, cfg, steps: int) -> float:
    """The student's own training step on in-memory tensors: the library's ``train_step`` of the same step
    module, batch, size, losses and optimiser as ``fit`` (AdamW with its weight-decay groups, gradient
    clipping at the recipe's norm), on a batch already in memory."""
    from distill import train_step
    from distill.config import Recipe, apply_options
    from distill.optim import make_optimizer
    from distill.plan import probe_batch, step_module

    recipe = apply_options(Recipe(), {"loss_weights": {"cosine": 1.0, "contrastive": 1.0}})
    step = step_module(_student(name, embed_dim, cfg), recipe).train()
    opt = make_optimizer(step, recipe.optim, torch.device("cpu"))
    batch = probe_batch(step.model, cfg["batch"])
    for _ in range(2):
        train_step(step, batch, opt, recipe.optim.lr, recipe.optim.grad_clip)
    tic = time.perf_counter()
    for _ in range(steps):
        train_step(step, batch, opt, recipe.optim.lr, recipe.optim.grad_clip)
    return steps * cfg["batch"] / (time.perf_counter() - tic)


def fit(name: str, teacher, cfg, work: Path, data: Path, mode: str, workers: int) -> dict:
    """One ``fit``: ``cached_packed``, ``cached_jpeg`` or ``online``; samples/s after the loader's start."""
    from distill import Distiller

    opts = dict(output_dir=str(work / f"run_{name}_{mode}"), max_steps=cfg["steps"] + 2, batch_size=cfg["batch"],
                num_workers=workers, progress=False, health_every=0, log_every=1000, overwrite=True,
                loss_weights={"cosine": 1.0, "contrastive": 1.0})
    student = _student(name, teacher.embed_dim, cfg)
    if mode == "online":
        r = Distiller(teacher, student, **opts).fit(str(data))
    else:
        packed = {"packed": str(work / "pack")} if mode == "cached_packed" else {}
        r = Distiller(None, student, cache=str(work / "cache"), **packed, **opts).fit(str(data))
    t = r.extra["timing"]["steady"]
    # the one checkpoint of a run (train.checkpoint_every: 0) is a fixed cost, not a per-step one: it is reported
    # in seconds, and the rate is that of the steps (data, step, logging, hooks)
    train = sum(t[k] for k in ("data_s", "step_s", "log_s", "hooks_s"))
    return {"per_s": t["steps"] * cfg["batch"] / train, "steps": t["steps"], "train_s": train,
            "checkpoint_s": t["checkpoint_s"], "share": {k[:-2]: t[k] / train for k in ("data_s", "step_s", "log_s", "hooks_s")}}


def teacher_ceiling(teacher, size: int, batch: int, steps: int) -> float:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        teacher.encode_image(x)
        tic = time.perf_counter()
        for _ in range(steps):
            teacher.encode_image(x)
    return steps * batch / (time.perf_counter() - tic)


def build(teacher, data: Path, out: Path, workers: int, batch: int, reader=None) -> float:
    """Views/s of the cache's image pass (decode or read, crop, teacher forward, write)."""
    from distill.cache import TeacherService

    s = TeacherService(teacher, out, batch_size=batch, num_workers=workers, progress=False, reader=reader).build(
        str(data), views=2)
    return s.images_per_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--students", default="vit_tiny,resnet18,mobilevit_s,bert_small")
    ap.add_argument("--workers", type=int, default=None, help="data.num_workers for every run (default: the recipe default)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--tag", default="", help="suffix of the JSON name (e.g. _before)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="ceiling and cached+packed fit alternate this many times; medians are reported (a shared "
                         "machine's speed drifts by more than the gaps measured)")
    args = ap.parse_args()
    cfg = _settings(args.quick)
    from distill.config import Recipe
    from distill.data.packed import PackedImages, pack_images

    workers = Recipe().data.num_workers if args.workers is None else args.workers
    work = Path(tempfile.mkdtemp(prefix="overhead_"))
    data = _data(work, cfg["photos"])
    teacher = _teacher(cfg)
    pack_images(str(data), work / "pack", size=max(cfg["teacher_size"], *cfg["sizes"].values()), progress=False)
    # cache build: the teacher's forward alone vs the real builds (the packed build's cache trains below)
    rounds = max(1, args.rounds)
    ceilings, packs = [], []
    for i in range(rounds):  # alternated: each ratio compares neighbours in time
        ceilings.append(teacher_ceiling(teacher, cfg["teacher_size"], cfg["batch"], 4))
        packs.append(build(teacher, data, work / ("cache" if i == 0 else f"cache_{i}"), workers, cfg["batch"],
                           PackedImages(work / "pack")))
    build_ceiling, packed_build = median(ceilings), median(packs)
    jpeg_build = build(teacher, data, work / "cache_jpeg", workers, cfg["batch"])
    build_rounds = {"ceiling_per_s": ceilings, "packed_per_s": packs}
    students = {}
    for name in args.students.split(","):
        row = {"where": {}, "checkpoint_s": {}, "rounds": {"ceiling_per_s": [], "cached_packed_per_s": []}}
        for _ in range(rounds):
            row["rounds"]["ceiling_per_s"].append(ceiling(name, teacher.embed_dim, cfg, cfg["steps"]))
            r = fit(name, teacher, cfg, work, data, "cached_packed", workers)
            row["rounds"]["cached_packed_per_s"].append(r["per_s"])
        row["ceiling_per_s"] = median(row["rounds"]["ceiling_per_s"])
        row["cached_packed_per_s"] = median(row["rounds"]["cached_packed_per_s"])
        row["where"]["cached_packed"], row["checkpoint_s"]["cached_packed"] = r["share"], r["checkpoint_s"]
        modes = ("cached_jpeg", "online") if name in IMAGE_STUDENTS else ("online",)
        for mode in modes:
            r = fit(name, teacher, cfg, work, data, mode, workers)
            row[f"{mode}_per_s"] = r["per_s"]
            row["where"][mode] = r["share"]
            row["checkpoint_s"][mode] = r["checkpoint_s"]
        if name not in IMAGE_STUDENTS:
            row["cached_jpeg_per_s"] = None  # a text student reads no images: "cached_packed" is its cached run
        students[name] = row
    print(f"\n{'quick: ' if args.quick else ''}batch {cfg['batch']}, data.num_workers {workers}, "
          f"{torch.get_num_threads()} compute threads; ceiling and cached_packed: medians of {rounds} alternated rounds")
    print(f"{'student':12} {'run':14} {'samples/s':>10} {'of ceiling':>10} {'data wait':>9} {'step':>6} {'logging':>8} "
          f"{'ckpt (s)':>8}")
    for name, row in students.items():
        print(f"{name:12} {'ceiling':14} {row['ceiling_per_s']:10.1f} {1:10.2f}")
        for mode, share in row["where"].items():
            v = row[f"{mode}_per_s"]
            print(f"{'':12} {mode:14} {v:10.1f} {v / row['ceiling_per_s']:10.2f} {share['data']:9.1%} "
                  f"{share['step']:6.1%} {share['log']:8.1%} {row['checkpoint_s'][mode]:8.2f}")
        per_round = [f / c for f, c in zip(row["rounds"]["cached_packed_per_s"], row["rounds"]["ceiling_per_s"])]
        row["cached_packed_ratio_rounds"] = per_round
        print(f"{'':12} {'(rounds)':14} cached_packed / ceiling per round: {', '.join(f'{x:.2f}' for x in per_round)}")
    print(f"cache build (views/s): teacher forward {build_ceiling:.1f}, from a pack {packed_build:.1f} "
          f"({packed_build / build_ceiling:.2f}), from JPEGs {jpeg_build:.1f} ({jpeg_build / build_ceiling:.2f})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result(f"overhead{'_quick' if args.quick else ''}{args.tag}", device, args.out, ("timm", "open_clip"),
                 quick=args.quick, batch=cfg["batch"], num_workers=workers, compute_threads=torch.get_num_threads(),
                 sizes=cfg["sizes"], students=students,
                 rounds=rounds, cache_build={"ceiling_per_s": build_ceiling, "packed_per_s": packed_build,
                                             "jpeg_per_s": jpeg_build, "rounds": build_rounds})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
