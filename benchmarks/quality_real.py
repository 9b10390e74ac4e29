"""Real data, real numbers: every student measured against its teacher on real images and captions.

Two tracks, through the public API only (load_teacher, TeacherService, Distiller, Tuner, eval):

* text:  MiniLM-L6 (``text:minilm``) -> bert_small students, distilled from the cached teacher on the
         35,455 flickr8k captions; caption-to-caption R@1/R@5 on the 5,000 flickr1k captions.
* image: a LiT teacher (frozen MiniLM text tower, image tower trained here on 90% of CIFAR-10 train
         with prompt captions + 800 flickr1k photos) -> vit_tiny / resnet18 / mobilevit_s, distilled
         from the teacher cache; zero-shot top-1 on the held-out 10% of CIFAR-10, i2t R@1 on the 200
         held-out flickr1k photos.

    python benchmarks/quality_real.py --quick          # 2 CPU cores, < 45 min
    python benchmarks/quality_real.py                  # full mode (224 px, ViT-B/32-sized teacher): a GPU
    python benchmarks/quality_real.py --quick --work runs/qr --eval-classes DIR --eval-captions FILE

``--work`` keeps teacher, caches and students: a second run with the same folder retrains nothing and
only (re-)evaluates, so extra evaluation sets can be added to a finished run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

from distill import Distiller, Tuner, create_student, load_teacher
from distill.cache import TeacherService
from distill.data import Rows, load_rows
from distill.eval import (caption_pairs, caption_retrieval, count_params, embed_images, embed_texts, fidelity,
                          images_per_second, retrieval_recall, zero_shot_accuracy)
from distill.students import load_student

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "a photo of a {}."

# Everything that differs between the CPU quick mode and the GPU full mode.
MODES = {
    "quick": {
        # 2 CPU cores: the text students start from the teacher's first layers (DistilBERT-style)
        "text_steps": 300, "text_batch": 128, "text_lr": 3e-4,
        "text_students": {
            "bert_small": {"pretrained": "minilm", "num_layers": 4},
            "bert_small_2l": {"pretrained": "minilm", "num_layers": 2},
        },
        "teacher_tower": ("timm:resnet18", {}), "teacher_size": 32, "teacher_steps": 450,
        "teacher_batch": 256, "teacher_lr": 2e-3, "queue": 4096,
        "student_size": 32, "student_steps": 200, "student_batch": 256, "student_lr": 2e-3, "views": 2,
        "image_students": {
            "vit_tiny": {"model_kwargs": {"patch_size": 8}},  # 4x4 tokens at 32 px
            "resnet18": {},
            "mobilevit_s": {},
        },
    },
    "full": {
        "text_steps": 3000, "text_batch": 256, "text_lr": 2e-4,
        "text_students": {
            "bert_small": {"pretrained": "minilm", "num_layers": 4},
            "bert_small_2l": {"pretrained": "minilm", "num_layers": 2},
            "bert_small_scratch": {"lr": 1e-3},  # 4 x 256, random init
        },
        "teacher_tower": ("timm:vit_base_patch32_224", {}), "teacher_size": 224, "teacher_steps": 6000,
        "teacher_batch": 512, "teacher_lr": 1e-3, "queue": 8192,
        "student_size": 224, "student_steps": 4000, "student_batch": 256, "student_lr": 1e-3, "views": 4,
        "image_students": {"vit_tiny": {}, "resnet18": {}, "mobilevit_s": {"image_size": 256}},
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cifar_rows(assets: Path, work: Path) -> Rows:
    root = work / "cifar10"
    if not (root / "train").is_dir():
        log("extracting CIFAR-10 train")
        with tarfile.open(assets / "cifar10-train.tar.gz") as tar:
            tar.extractall(root, filter="data")
    return load_rows(root / "train")  # class folders -> "a photo of a {class}." + labels


def split(n: int, held: float, seed: int = 0) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * held))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def flickr_split(assets: Path) -> tuple[Rows, Rows]:
    rows = load_rows(assets / "flickr1k" / "captions.csv")
    photos = sorted(set(rows.images))
    train_idx, _ = split(len(photos), 0.2)
    train_photos = {photos[i] for i in train_idx}
    keep = [i for i, p in enumerate(rows.images) if p in train_photos]
    held = [i for i, p in enumerate(rows.images) if p not in train_photos]
    return rows.subset(keep), rows.subset(held)


def concat(*parts: Rows) -> Rows:
    return Rows([i for r in parts for i in r.images], [c for r in parts for c in r.captions],
                source="+".join(r.source for r in parts))


# -- measurement helpers ----------------------------------------------------------------------
def per_second(fn, n: int) -> float:
    tic = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return n / (time.perf_counter() - tic)


def on(model, device):
    return model.to(device).eval()


# -- text track -------------------------------------------------------------------------------
def text_track(cfg: dict, assets: Path, work: Path, device: str, workers: int) -> tuple[dict, dict]:
    teacher = on(load_teacher("text:minilm"), device)
    train = read_csv(assets / "flickr8k-text-only.csv")
    rows = Rows([None] * len(train), [r["caption"] for r in train], source="flickr8k-text-only.csv")
    cache = work / "text_cache"
    log(f"text: caching the teacher over {len(rows)} captions")
    TeacherService(teacher, cache, device=device, num_workers=0).build(rows)
    evals = read_csv(assets / "flickr1k" / "captions.csv")
    caps, groups = [r["caption"] for r in evals], [r["image"] for r in evals]
    t_emb = embed_texts(teacher, caps)
    out = {"teacher": {"name": "minilm_l6 (text:minilm)", "params": count_params(teacher),
                       **caption_retrieval(t_emb, groups)}, "students": {}}
    models = {}
    for name, kwargs in cfg["text_students"].items():
        run = work / "text" / name
        if (run / "student" / "config.json").exists():
            student = load_student(run / "student")
        else:
            log(f"text: distilling {name}")
            torch.manual_seed(0)
            kwargs = dict(kwargs)
            lr = kwargs.pop("lr", cfg["text_lr"])
            student = create_student("bert_small", embed_dim=teacher.embed_dim, **kwargs)
            Distiller(None, student, cache=str(cache), output_dir=str(run), batch_size=cfg["text_batch"],
                      max_steps=cfg["text_steps"], lr=lr, warmup_steps=min(100, cfg["text_steps"] // 10), num_workers=0,
                      checkpoint_every=500, resume=True).fit(rows)
            student = load_student(run / "student")
        student = on(student, device)
        s_emb = embed_texts(student, caps)
        rate = per_second(lambda: embed_texts(student, caps), len(caps))
        out["students"][name] = {"params": count_params(student), **caption_retrieval(s_emb, groups),
                                 "fidelity": fidelity(s_emb, t_emb), "per_s": rate}
        models[name] = student
    models["teacher"] = teacher
    return out, models


# -- image track ------------------------------------------------------------------------------
def image_track(cfg: dict, assets: Path, work: Path, device: str, workers: int) -> tuple[dict, dict, dict]:
    cifar = cifar_rows(assets, work)
    c_train, c_held = split(len(cifar), 0.1)
    f_train, f_held = flickr_split(assets)
    train = concat(cifar.subset(c_train), f_train)
    teacher_dir = work / "teacher" / "model"
    if not (teacher_dir / "config.json").exists():
        log(f"image: LiT-tuning the teacher on {len(train)} pairs")
        tower, kw = cfg["teacher_tower"]
        torch.manual_seed(0)
        model = create_student(f"{tower}+hf:minilm", embed_dim=384,
                               image_kwargs=dict(kw, image_size=cfg["teacher_size"]))
        Tuner(model, lock="text", queue=cfg["queue"], batch_size=cfg["teacher_batch"],
              max_steps=cfg["teacher_steps"], lr=cfg["teacher_lr"], warmup_steps=min(200, cfg["teacher_steps"] // 10), num_workers=workers,
              crop_scale=(0.6, 1.0), checkpoint_every=500, resume=True, output_dir=str(work / "teacher")).fit(train)
    teacher = on(load_teacher(str(teacher_dir)), device)
    cache = work / "image_cache"
    images_only = Rows(train.images, [None] * len(train), source=train.source)  # image side only
    log("image: caching the teacher")
    TeacherService(teacher, cache, device=device, num_workers=workers).build(images_only, views=cfg["views"])

    held = cifar.subset(c_held)
    classes = [c.replace("_", " ") for c in cifar.classes]
    class_emb = teacher.encode_text([TEMPLATE.format(c) for c in classes]).cpu()
    f_images, f_texts, f_pairs = caption_pairs(f_held)
    t_txt = embed_texts(teacher, f_texts)

    def measure(model) -> dict:
        img = embed_images(model, held.images, batch_size=256)
        f_img = embed_images(model, f_images, batch_size=64)
        return {"img": img, "zero_shot_top1": zero_shot_accuracy(img, held.labels, class_emb, (1,))["top1"],
                "i2t_r1": retrieval_recall(f_img, t_txt, f_pairs, (1,))["i2t_r1"]}

    t = measure(teacher)
    t_params = count_params(teacher.model.image)
    out = {"teacher": {"name": f"LiT {cfg['teacher_tower'][0]} @ {cfg['teacher_size']}px + frozen MiniLM-L6",
                       "params_image": t_params, "zero_shot_top1": t["zero_shot_top1"], "i2t_r1": t["i2t_r1"]},
           "students": {}}
    models = {"teacher": teacher}
    for name, kwargs in cfg["image_students"].items():
        run = work / "image" / name
        if not (run / "student" / "config.json").exists():
            log(f"image: distilling {name}")
            torch.manual_seed(0)
            kwargs = dict(kwargs)
            size = kwargs.pop("image_size", cfg["student_size"])
            student = create_student(name, embed_dim=teacher.embed_dim, image_size=size, **kwargs)
            Distiller(None, student, cache=str(cache), output_dir=str(run), batch_size=cfg["student_batch"],
                      max_steps=cfg["student_steps"], lr=cfg["student_lr"], warmup_steps=min(100, cfg["student_steps"] // 10), num_workers=workers,
                      crop_scale=(0.6, 1.0), checkpoint_every=400, resume=True).fit(images_only)
        student = on(load_student(run / "student"), device)
        s = measure(student)
        rate = images_per_second(student.encode_image, student.preprocess.image_size, batch_size=256, iters=3,
                                 device=device)
        params = count_params(student.image)
        out["students"][name] = {"params_image": params, "zero_shot_top1": s["zero_shot_top1"],
                                 "i2t_r1": s["i2t_r1"], "fidelity": fidelity(s["img"], t["img"]), "per_s": rate}
        models[name] = student
    return out, models, {"teacher": teacher}


# -- extra evaluation sets ---------------------------------------------------------------------
def extra_sets(args, image_models: dict, text_models: dict, teacher) -> dict:
    extra: dict = {}
    if args.eval_classes:
        rows = load_rows(args.eval_classes)
        if rows.labels is None:
            raise SystemExit(f"--eval-classes {args.eval_classes}: expected a folder of class subfolders")
        class_emb = teacher.encode_text([TEMPLATE.format(c.replace("_", " ")) for c in rows.classes]).cpu()
        extra[Path(args.eval_classes).name] = {
            name: {"zero_shot_top1": zero_shot_accuracy(embed_images(m, rows.images, 128), rows.labels,
                                                        class_emb, (1,))["top1"]}
            for name, m in image_models.items()}
    if args.eval_captions:
        rows = load_rows(args.eval_captions)
        images, texts, pairs = caption_pairs(rows)
        t_txt = embed_texts(teacher, texts)
        res = {name: {k: v for k, v in retrieval_recall(embed_images(m, images, 64), t_txt, pairs, (1, 5)).items()}
               for name, m in image_models.items()}
        # the photo of each (unique) caption; a caption shared by two photos keeps the first
        photo_of: dict[int, int] = {}
        for i, j in pairs:
            photo_of.setdefault(j, i)
        groups = [photo_of[j] for j in range(len(texts))]
        for name, m in text_models.items():
            res[f"text:{name}"] = {f"c2c_{k}": v for k, v in caption_retrieval(embed_texts(m, texts), groups).items()}
        extra[Path(args.eval_captions).stem] = res
    return extra


def versions() -> dict:
    libs = ("timm", "transformers", "accelerate", "distill")
    return {"torch": torch.__version__, "python": platform.python_version(),
            **{lib: getattr(importlib.import_module(lib), "__version__", "?") for lib in libs}}


def print_table(result: dict) -> None:
    text, image = result["tracks"]["text"], result["tracks"]["image"]
    t = text["teacher"]
    print(f"\ntext track (caption->caption on flickr1k, 5,000 captions)\n{'model':24} {'params':>10} {'R@1':>6} "
          f"{'R@5':>6} {'fidel':>6} {'/s':>8} {'R@1 kept':>8}")
    print(f"{'teacher ' + 'minilm_l6':24} {t['params']:>10,} {t['r1']:6.3f} {t['r5']:6.3f}")
    for n, s in text["students"].items():
        print(f"{n:24} {s['params']:>10,} {s['r1']:6.3f} {s['r5']:6.3f} {s['fidelity']:6.3f} {s['per_s']:8.0f} "
              f"{s['r1'] / t['r1']:8.1%}")
    t = image["teacher"]
    print(f"\nimage track (zero-shot on 5,000 held-out CIFAR-10, i2t on 200 held-out flickr1k photos)\n"
          f"{'model':24} {'params':>10} {'ratio':>6} {'top1':>6} {'i2t@1':>6} {'fidel':>6} {'img/s':>8} "
          f"{'top1 kept':>9} {'i2t kept':>8}")
    print(f"{'teacher':24} {t['params_image']:>10,} {'':>6} {t['zero_shot_top1']:6.3f} {t['i2t_r1']:6.3f}")
    for n, s in image["students"].items():
        kept = [s[k] / t[k] if t[k] else float("nan") for k in ("zero_shot_top1", "i2t_r1")]
        print(f"{n:24} {s['params_image']:>10,} {s['params_image'] / t['params_image']:6.1%} "
              f"{s['zero_shot_top1']:6.3f} {s['i2t_r1']:6.3f} {s['fidelity']:6.3f} {s['per_s']:8.0f} "
              f"{kept[0]:9.1%} {kept[1]:8.1%}")
    for set_name, per_model in result["extra"].items():
        print(f"\nextra: {set_name}")
        for m, metrics in per_model.items():
            print(f"  {m:22} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small towers at 32 px: 2 CPU cores, < 45 min")
    p.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--work", default=None, help="keeps teacher, caches and students (default: runs/quality_real_<mode>)")
    p.add_argument("--eval-classes", default=None, help="a class-folder image set to add to the evaluation")
    p.add_argument("--eval-captions", default=None, help="an image,caption CSV to add to the evaluation")
    p.add_argument("--tracks", default="text,image")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    cfg, assets = MODES[mode], Path(args.assets)
    if not (assets / "flickr1k" / "captions.csv").exists():
        raise SystemExit(f"{assets}: the real-data assets are missing (see ../shared/assets/README.md)")
    work = Path(args.work or ROOT / "runs" / f"quality_real_{mode}")
    work.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tic = time.perf_counter()
    tracks, text_models, image_models, teacher = {}, {}, {}, None
    if "text" in args.tracks:
        tracks["text"], text_models = text_track(cfg, assets, work, device, args.workers)
    if "image" in args.tracks:
        tracks["image"], image_models, t = image_track(cfg, assets, work, device, args.workers)
        teacher = t["teacher"]
    extra = extra_sets(args, image_models, text_models, teacher) if teacher is not None else {}
    result = {"mode": mode, "device": torch.cuda.get_device_name() if device == "cuda" else
              f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)",
              "versions": versions(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "tracks": tracks, "extra": extra}
    if set(tracks) == {"text", "image"}:
        print_table(result)
    out = Path(args.out) / ("quality_real_quick.json" if args.quick else "quality_real.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out} in {(time.perf_counter() - tic) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
