"""The real ``clip_benchmark eval`` CLI on a student exported as open_clip, beside ``distill eval`` on the same data.

    python benchmarks/external_eval.py --student RUN_OR_STUDENT --teacher TEACHER [--per-class 100]
        [--assets ../shared/assets] [--clip-benchmark clip_benchmark] [--work DIR] [--out benchmarks/results]

An image-only student is paired with its teacher's text tower (``pair_with_teacher_text``), saved, and
exported with ``distill export --format open_clip`` (parity gate included). Data: ``--per-class`` CIFAR-10
images per class (the first ones of ``cifar10-train.tar.gz``), laid out as clip_benchmark's local
webdataset (``wds/``: tar shards, classnames.txt, templates) and as class folders for ``distill eval``;
flickr1k photos + captions through clip_benchmark's ``flickr8k`` route (folder + annotation file).
Both tools use the same prompt templates. clip_benchmark runs with ``--no_amp`` (CPU autocast changes
the numbers), an explicit ``--output`` and ``--num_workers 0``.

clip-benchmark 1.6.2 imports ``requests`` without declaring it, and its zero-shot metric fails on numpy
>= 2.4 (``float()`` of a 1-element array): install it with ``pip install -e ".[clip-benchmark]"``, which
pins both, or point ``--clip-benchmark`` at a ``clip_benchmark`` executable of an environment that has them
(this script checks that environment's numpy first). Retrieval can differ slightly: each tool crops the
non-square photos its own way (open_clip resizes then centre-crops, distill crops then resizes), and a
repeated caption is one text per (photo, caption) row in clip_benchmark but one per distinct text in
``distill eval``. The export's parity table (``parity.json`` in the open_clip folder) measures the former.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a low resolution photo of a {}.", "a photo of the {}.",
             "a close-up photo of a {}.", "a painting of a {}.")
CIFAR = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_subset(tar_path: Path, out: Path, per_class: int) -> list[tuple[str, int, bytes]]:
    """The first ``per_class`` JPEGs (sorted by name) of each class: (name, label, bytes); also written
    as class folders under ``out`` for ``distill eval``."""
    picked: dict[str, list[tarfile.TarInfo]] = {c: [] for c in CIFAR}
    with tarfile.open(tar_path) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        for m in members:
            cls = Path(m.name).parent.name
            if cls in picked and len(picked[cls]) < per_class:
                picked[cls].append(m)
        samples = []
        for label, cls in enumerate(CIFAR):
            (out / cls).mkdir(parents=True, exist_ok=True)
            for m in picked[cls]:
                data = tar.extractfile(m).read()
                (out / cls / Path(m.name).name).write_bytes(data)
                samples.append((f"{cls}_{Path(m.name).stem}", label, data))
    return samples


def write_wds(samples: list[tuple[str, int, bytes]], root: Path, templates: tuple[str, ...]) -> Path:
    """clip_benchmark's local webdataset layout: test/{0.tar, nshards.txt}, classnames.txt, templates."""
    (root / "test").mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for key, label, data in samples:
            for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (root / "test" / "nshards.txt").write_text("1\n")
    (root / "classnames.txt").write_text("\n".join(CIFAR) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(t.replace("{}", "{c}") for t in templates) + "\n")
    return root


def flickr_annotations(captions_csv: Path, out: Path) -> Path:
    """clip_benchmark's flickr annotation file: a header, then ``<image>.jpg,<caption>`` lines."""
    with open(captions_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    out.write_text("image,caption\n" + "".join(f"{r['image']},{' '.join(r['caption'].split())}\n" for r in rows),
                   encoding="utf-8")
    return out


def run(cmd: list[str], **kwargs) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def check_clip_benchmark(executable: str) -> tuple[str, str]:
    """(clip-benchmark version, numpy version) of the clip_benchmark environment, after checking
    what 1.6.2 needs there."""
    exe = shutil.which(executable) or executable
    python = Path(exe).with_name("python")
    code = ("import numpy, importlib.metadata as m; import requests, webdataset; "
            "print(m.version('clip-benchmark'), numpy.__version__)")
    got = subprocess.run([str(python) if python.exists() else sys.executable, "-c", code], capture_output=True, text=True)
    if got.returncode:
        sys.exit(f"clip_benchmark environment ({exe}) is missing a package: {got.stderr.strip().splitlines()[-1]}; "
                 'pip install -e ".[clip-benchmark]"')
    version, numpy_version = got.stdout.split()
    if tuple(int(x) for x in numpy_version.split(".")[:2]) >= (2, 4):
        sys.exit(f"clip_benchmark's zero-shot metric fails on numpy {numpy_version} (>= 2.4) in {exe}: "
                 'pip install -e ".[clip-benchmark]" pins numpy<2.4 (or use a separate environment: --clip-benchmark)')
    return version, numpy_version


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True, help="student folder or run folder (an image student is paired)")
    p.add_argument("--teacher", required=True, help="teacher whose text tower pairs an image student (and for distill eval)")
    p.add_argument("--pretrained", default=None)
    p.add_argument("--per-class", type=int, default=100, help="CIFAR-10 images per class")
    p.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--clip-benchmark", default="clip_benchmark", help="the clip_benchmark executable")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)

    from distill.export import export, pair_with_teacher_text
    from distill import load_student
    from distill.teachers import load_teacher

    cb_version, cb_numpy = check_clip_benchmark(args.clip_benchmark)
    assets = Path(args.assets)
    work = Path(args.work) if args.work else Path(__import__("tempfile").mkdtemp(prefix="external_eval_"))
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.student)
    src = src / "student" if not (src / "config.json").exists() and (src / "student" / "config.json").exists() else src
    student = load_student(src)
    if student.text is None:
        student = pair_with_teacher_text(student, load_teacher(args.teacher, pretrained=args.pretrained))
    pair_dir = student.save(work / "student")
    exported = export(student, work / "open_clip", "open_clip", data=str(assets / "flickr1k" / "captions.csv"))
    oc = exported.path

    samples = cifar_subset(assets / "cifar10-train.tar.gz", work / "cifar", args.per_class)
    wds = write_wds(samples, work / "wds_cifar10", TEMPLATES)
    ann = flickr_annotations(assets / "flickr1k" / "captions.csv", work / "flickr1k_ann.txt")
    (work / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    common = [args.clip_benchmark, "eval", "--model_type", "open_clip", "--model", f"local-dir:{oc}",
              "--pretrained", "none", "--no_amp", "--num_workers", "0", "--batch_size", "64"]
    run(common + ["--dataset", "wds/cifar10", "--dataset_root", str(wds), "--task", "zeroshot_classification",
                  "--output", str(work / "cb_zeroshot.json")], cwd=work)
    run(common + ["--dataset", "flickr8k", "--dataset_root", str(assets / "flickr1k"), "--annotation_file", str(ann),
                  "--task", "zeroshot_retrieval", "--recall_k", "1", "5", "10", "--output", str(work / "cb_retrieval.json")],
        cwd=work)
    run([sys.executable, "-m", "distill.cli", "eval", "--student", str(pair_dir), "--teacher", args.teacher,
         *(["--pretrained", args.pretrained] if args.pretrained else []), "--data", str(assets / "flickr1k" / "captions.csv"),
         "--classes", str(work / "cifar"), "--templates", str(work / "templates.txt"), "--out", str(work / "distill_eval"),
         "--device", "cpu"], env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})

    cb = {**json.loads((work / "cb_zeroshot.json").read_text())["metrics"],
          **json.loads((work / "cb_retrieval.json").read_text())["metrics"]}
    ours = json.loads((work / "distill_eval" / "results.json").read_text())["student"]
    rows = [("zero-shot top-1 (CIFAR-10)", cb["acc1"], ours["zero_shot_top1"], "same images, prompts, weights"),
            ("zero-shot top-5 (CIFAR-10)", cb["acc5"], ours["zero_shot_top5"], "")]
    for k in (1, 5, 10):
        note = "see below" if k == 1 else ""
        rows.append((f"text->image R@{k} (flickr1k)", cb[f"image_retrieval_recall@{k}"], ours[f"t2i_r{k}"], note))
        rows.append((f"image->text R@{k} (flickr1k)", cb[f"text_retrieval_recall@{k}"], ours[f"i2t_r{k}"], note))
    pre = exported.parity["preprocess"]
    retrieval_note = (
        "retrieval: each tool preprocesses the (non-square) photos itself: open_clip resizes the short side then "
        "centre-crops, distill crops the centre square then resizes; on flickr1k photos the student's embeddings "
        f"of the two agree to mean cosine {pre['mean_cosine']:.4f} (min {pre['min_cosine']:.4f}), which moves "
        "near-tied ranks. Repeated captions count once per (photo, caption) row in clip_benchmark and once per "
        "distinct text in distill eval. The 32x32 CIFAR images need no crop: zero-shot sees identical pixels.")
    print(f"\n{'metric':30} {'clip_benchmark':>15} {'distill eval':>13} {'delta':>8}  note")
    for name, a, b, note in rows:
        print(f"{name:30} {a:15.4f} {b:13.4f} {b - a:+8.4f}  {note}")
    delta = abs(rows[0][1] - rows[0][2])
    print(f"\n{retrieval_note}")
    print(f"\nzero-shot top-1 agreement: |delta| = {delta:.4f} ({'within' if delta <= 0.002 else 'OUTSIDE'} 0.002)")
    write_result("external_eval", torch.device("cpu"), args.out, ("open_clip", "timm", "transformers"),
                 clip_benchmark=cb_version, clip_benchmark_numpy=cb_numpy, student=str(src), teacher=args.teacher, cifar_per_class=args.per_class,
                 cifar_images=len(samples), flickr_rows=sum(1 for _ in open(ann)) - 1, templates=list(TEMPLATES),
                 clip_benchmark_flags=["--no_amp", "--num_workers 0", "--batch_size 64", "--pretrained none"],
                 results=[{"metric": n, "clip_benchmark": a, "distill_eval": b, "delta": b - a, "note": note}
                          for n, a, b, note in rows], zero_shot_top1_agrees=delta <= 0.002, notes=retrieval_note,
                 export_parity={k: exported.parity[k] for k in ("image", "text", "preprocess")})
    return 0 if delta <= 0.002 else 1


if __name__ == "__main__":
    sys.exit(main())
