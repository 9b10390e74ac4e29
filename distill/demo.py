"""``distill demo``: an offline end-to-end distillation on generated data.

No CLIP weights can be downloaded offline, so the demo says so and builds everything it
needs: a captioned set of drawn shapes (colour, shape, size, position) with a held-out split,
a small teacher CLIP trained on it once (cached under the user cache dir), and a student
distilled from that teacher through the same ``Distiller`` a real user calls. With
``--teacher`` and ``--data`` it distils a real teacher on real data instead.
"""
from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .io import cache_root

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230),
          "yellow": (235, 210, 40), "purple": (150, 60, 200), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "cross")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
TEMPLATES = ("a {size} {color} {shape} on the {pos}", "a {color} {shape}", "{color} {shape}, {size}, {pos}",
             "a picture of a {size} {color} {shape}", "the {shape} is {color} and {size}", "{pos}: a {color} {shape}")
PROMPTS = ("a {}", "a picture of a {}")
DATA_VERSION = "shapes_v1"
TEACHER_VERSION = "teacher_v1"


def _draw(rng: np.random.Generator, size: int, color: str, shape: str, big: bool, pos: str):
    from PIL import Image, ImageDraw

    s = size * 4  # draw large, then downsample for anti-aliasing
    bg = tuple(int(v) for v in rng.integers(20, 90, 3))
    im = Image.new("RGB", (s, s), bg)
    d = ImageDraw.Draw(im)
    r = s * (0.26 if big else 0.15) * rng.uniform(0.9, 1.1)
    cx, cy = {"left": (0.3, 0.5), "right": (0.7, 0.5), "top": (0.5, 0.3), "bottom": (0.5, 0.7),
              "center": (0.5, 0.5)}[pos]
    cx, cy = (cx + rng.uniform(-0.05, 0.05)) * s, (cy + rng.uniform(-0.05, 0.05)) * s
    rgb = tuple(int(np.clip(v + rng.integers(-20, 21), 0, 255)) for v in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
    else:
        w = r / 3
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)
    noise = rng.integers(-12, 13, (s, s, 3))
    arr = np.clip(np.asarray(im, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).resize((size, size), resample=Image.Resampling.LANCZOS)


def make_shapes(out: str | Path, n_train: int = 4000, n_test: int = 1000, size: int = 32, seed: int = 0) -> Path:
    """Write ``images/*.png``, ``train.csv`` (random caption templates), ``test.csv`` (one canonical
    caption per image) and ``classes.csv`` (label = colour x shape) into ``out``."""
    out = Path(out)
    if (out / "test.csv").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    (tmp / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colors, classes = list(COLORS), [f"{c} {s}" for c in COLORS for s in SHAPES]
    for split, n in (("train", n_train), ("test", n_test)):
        with open(tmp / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption", "label"])
            for k in range(n):
                c, sh = colors[rng.integers(len(colors))], SHAPES[rng.integers(len(SHAPES))]
                sz, pos = SIZES[rng.integers(2)], POSITIONS[rng.integers(len(POSITIONS))]
                name = f"images/{split}_{k:05d}.png"
                _draw(rng, size, c, sh, sz == "large", pos).save(tmp / name)
                template = TEMPLATES[rng.integers(len(TEMPLATES))] if split == "train" else TEMPLATES[0]
                w.writerow([name, template.format(size=sz, color=c, shape=sh, pos=pos), classes.index(f"{c} {sh}")])
    with open(tmp / "classes.csv", "w", encoding="utf-8") as f:
        f.write("label,name\n" + "".join(f"{i},{c}\n" for i, c in enumerate(classes)))
    if out.exists():  # another process finished first
        import shutil

        shutil.rmtree(tmp)
        return out
    os.replace(tmp, out)
    return out


@dataclass
class DemoSizes:
    """Model/run sizes; ``quick()`` is the smaller version the tests assert on."""

    n_train: int = 4000
    n_test: int = 1000
    image_size: int = 32
    embed_dim: int = 64
    teacher_steps: int = 300
    student_steps: int = 300
    batch_size: int = 128

    @classmethod
    def quick(cls) -> "DemoSizes":
        return cls(n_train=1500, n_test=300, teacher_steps=250, student_steps=250, batch_size=96)


def demo_teacher_model(embed_dim: int, image_size: int):
    """The demo teacher: ViT (4 x 128, patch 8) image tower + 2-layer BERT text tower."""
    from .students import create_student

    return create_student(
        "vit_tiny+bert_small", embed_dim=embed_dim,
        image_kwargs={"image_size": image_size, "model_kwargs": {"patch_size": 8, "embed_dim": 128, "depth": 4, "num_heads": 4}},
        text_kwargs={"hidden_size": 128, "num_layers": 2, "num_heads": 2, "context_length": 24},
    )


def demo_student(embed_dim: int, image_size: int):
    """The demo student: a ViT-Tiny narrowed to 64 wide and 3 deep (the registered ``vit_tiny``)."""
    from .students import create_student

    return create_student("vit_tiny", embed_dim=embed_dim, image_size=image_size,
                          model_kwargs={"patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2})


def train_demo_teacher(data: Path, out: Path, sizes: DemoSizes, seed: int = 0, progress: bool = True) -> Path:
    """Train (once) and save the demo teacher; returns its folder (loadable by ``load_teacher``)."""
    from .tune import Tuner

    if (out / "model" / "config.json").exists():
        return out / "model"
    import torch

    torch.manual_seed(seed)
    model = demo_teacher_model(sizes.embed_dim, sizes.image_size)
    Tuner(model, output_dir=str(out), max_steps=sizes.teacher_steps, batch_size=sizes.batch_size, lr=2e-3,
          warmup_steps=30, seed=seed, progress=progress, crop_scale=(0.8, 1.0), num_workers=1,
          weight_decay=0.05, resume=True).fit(str(data / "train.csv"))  # resume: a killed first demo continues
    return out / "model"


def run_demo(work_dir: str | Path | None = None, teacher: str | None = None, pretrained: str | None = None,
             data: str | None = None, student: str | None = None, sizes: DemoSizes | None = None,
             seed: int = 0, progress: bool = True, max_steps: int | None = None) -> dict[str, Any]:
    """Run the demo end to end and return ``{"teacher": {...}, "student": {...}, ...}``."""
    from .students import create_student
    from .teachers import load_teacher
    from .trainer import Distiller

    sizes = sizes or DemoSizes()
    root = cache_root() / "demo"
    work = Path(work_dir) if work_dir else root / "runs"
    tic = time.perf_counter()
    if teacher is None:
        print("No CLIP weights can be downloaded offline: the demo trains a small teacher CLIP on generated shapes "
              "(once, cached), then distils a smaller student from it with the same code path a real run takes.")
        suffix = "" if sizes == DemoSizes() else f"_{sizes.n_train}_{sizes.teacher_steps}_{seed}"
        data_dir = make_shapes(root / (DATA_VERSION + suffix), sizes.n_train, sizes.n_test, sizes.image_size, seed)
        teacher_dir = train_demo_teacher(data_dir, root / (TEACHER_VERSION + suffix), sizes, seed, progress)
        t = load_teacher(str(teacher_dir))
        import torch

        torch.manual_seed(seed)  # the same student init whether or not the teacher was cached
        s = create_student(student, embed_dim=t.embed_dim, image_size=sizes.image_size) if student \
            else demo_student(t.embed_dim, sizes.image_size)
        options = dict(lr=3e-3, warmup_steps=30, crop_scale=(0.8, 1.0), loss_weights={"cosine": 1.0, "contrastive": 1.0})
        train_file = data_dir / "train.csv"
    else:
        if data is None:
            from .errors import RecipeError

            raise RecipeError("--data: --teacher needs --data (a csv/jsonl of image,caption or a folder)")
        t = load_teacher(teacher, pretrained=pretrained)
        s = create_student(student or "vit_tiny", embed_dim=t.embed_dim)
        data_dir = _split_user_data(Path(data), work / "data", seed)
        train_file = data_dir / "train.csv"
        options = dict(lr=1e-3, warmup_steps=100)
    result = Distiller(t, s, output_dir=str(work / "distill"), max_steps=max_steps or sizes.student_steps,
                       batch_size=sizes.batch_size, seed=seed, progress=progress, num_workers=1,
                       overwrite=True, **options).fit(str(train_file))  # the demo's run folder is its own
    from .data import load_rows
    from .eval import evaluate_pair
    from .report import write_report

    test = load_rows(data_dir / "test.csv")
    results = evaluate_pair(t, result.student.eval(), captions=test, classes=test if test.labels else None,
                            templates=PROMPTS if teacher is None else None)
    results["student_dir"] = str(result.model_dir)
    results["report"] = str(write_report(results, result.model_dir / "eval", run_dir=result.output_dir,
                                         title="distill demo: student vs teacher on the held-out split"))
    results["seconds"] = time.perf_counter() - tic
    return results


def _split_user_data(src: Path, out: Path, seed: int, test_fraction: float = 0.1) -> Path:
    """Hold out ``test_fraction`` of the images of a user's data set (by image, not by caption)."""
    from .data import load_rows

    rows = load_rows(src)
    images = sorted({i for i in rows.images if i})
    rng = np.random.default_rng(seed)
    test = set(rng.permutation(images)[: max(1, int(len(images) * test_fraction))].tolist())
    out.mkdir(parents=True, exist_ok=True)
    for split, keep in (("train", lambda i: i not in test), ("test", lambda i: i in test)):
        with open(out / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            for img, cap in zip(rows.images, rows.captions):
                if img and cap and keep(img):
                    w.writerow([img, cap])
    return out
