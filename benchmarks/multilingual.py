"""Text students for captions the teacher cannot read (issue 17): one student for English and other languages.

The teacher is the English MiniLM-L6 (``text:minilm``). The student starts from MiniLM's blocks 0-3 and its last
(``student.kwargs.keep_layers``), with its vocabulary grown by a tokenizer trained on the other languages (``distill tokenizer train`` +
``student.kwargs.extend_vocab``), and learns parallel sentences: its embedding of each ``xx`` sentence and
of the ``en`` one regress (cosine) and contrast onto the teacher's embedding of the ``en`` sentence
(multilingual knowledge distillation). A second student starts from scratch on a tokenizer trained on the
captions. Evaluation: a caption in language xx of a flickr1k photo queries the 5,000 English captions (a hit
when the caption it retrieves belongs to that photo), and English caption->caption R@1 stays in view. With the
photo teacher of ``quality_real.py`` (EfficientNet-Lite0 + MiniLM, heads tuned), captions in each language also
query the 200 photos it held out, the students through its text head. Batches group sentences by length.

    python benchmarks/multilingual.py --quick                     # 2 CPU cores, < 30 min: German and French
    python benchmarks/multilingual.py --quick --small             # the student at most half of MiniLM's size:
        # its vocabulary trimmed to the parallel text's tokens, its FFN narrowed (student.kwargs.trim_vocab,
        # intermediate_size; benchmarks/text_students.py --compression)
    python benchmarks/multilingual.py --parallel my.csv --lang vi --eval flickr1k-vi.csv --out results/vi
        # any language: my.csv has columns en and vi; flickr1k-vi.csv is image,caption over flickr1k photos

Writes ``<out>/multilingual[_quick]_<device>.json`` with ``languages: {xx: {student_r1, student_r5, teacher_r1,
teacher_r5}}``, ``english: {student_r1, teacher_r1}`` and ``photos: {languages: {xx: {teacher_t2i_r1, ...}}}``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
REPO = Path(__file__).resolve().parent.parent
PHOTO_TEACHER = REPO / "runs" / "quality_real_quick" / "teacher" / "model"

# layers: the blocks of MiniLM-L6 the student keeps (the last one too: before any training, blocks
# [0, 1, 2, 3, 5] retrieve English captions at R@1 0.618, the first five at 0.484)
MODES = {
    "quick": {"layers": [0, 1, 2, 3, 5], "vocab": 8000, "steps": 1600, "batch": 64, "lr": 2e-4, "context": 40,
              "scratch_steps": 700, "scratch_batch": 64, "scratch_lr": 5e-4, "scratch_vocab": 12000, "queue": 1024},
    "full": {"layers": [0, 1, 2, 3, 5], "vocab": 12000, "steps": 20000, "batch": 256, "lr": 2e-4, "context": 64,
             "scratch_steps": 20000, "scratch_batch": 256, "scratch_lr": 5e-4, "scratch_vocab": 24000, "queue": 4096},
    "smoke": {"layers": [5], "vocab": 300, "steps": 4, "batch": 8, "lr": 2e-4, "context": 24,
              "scratch_steps": 3, "scratch_batch": 8, "scratch_lr": 5e-4, "scratch_vocab": 300, "queue": 0},
}


# --small: the student's vocabulary trimmed to the parallel text's tokens (twice or more), its FFN narrowed from
# 1536 to 768 neurons (the ones with the most effect on MiniLM's output over that text)
SMALL = {"trim_vocab": True, "min_token_count": 2, "intermediate_size": 768}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


class Evaluation:
    """Queries in each language against the 5,000 English captions, and English caption->caption R@1; the
    teacher embeds everything once, each student once too."""

    def __init__(self, teacher, queries: dict, english):
        from distill.eval import caption_retrieval

        key = os.path.realpath  # the same photo, however the two files name it
        self.queries = {x: ([c for i, c in zip(q.images, q.captions) if i and c],
                            [key(i) for i, c in zip(q.images, q.captions) if i and c]) for x, q in queries.items()}
        self.texts = [c for p, c in zip(english.images, english.captions) if p and c]
        self.groups = [key(p) for p, c in zip(english.images, english.captions) if p and c]
        self.teacher = self.embed(teacher)
        self.teacher_english = caption_retrieval(self.teacher["en"], self.groups, ks=(1,))["r1"]

    def embed(self, model) -> dict:
        from distill.eval import embed_texts

        return {"en": embed_texts(model, self.texts), **{x: embed_texts(model, t) for x, (t, _) in self.queries.items()}}

    def __call__(self, student) -> dict:
        from distill.eval import caption_retrieval, cross_lingual_recall

        emb, out = self.embed(student), {"languages": {}}
        for x, (_, groups) in self.queries.items():
            s = cross_lingual_recall(emb[x], groups, emb["en"], self.groups)
            t = cross_lingual_recall(self.teacher[x], groups, self.teacher["en"], self.groups)
            out["languages"][x] = {"student_r1": s["r1"], "student_r5": s["r5"], "teacher_r1": t["r1"],
                                   "teacher_r5": t["r5"]}
        out["english"] = {"teacher_r1": self.teacher_english,
                          "student_r1": caption_retrieval(emb["en"], self.groups, ks=(1,))["r1"]}
        return out


def photo_retrieval(photo_dir: Path, students: dict, queries: dict, english) -> dict:
    """Text->image R@1/R@5 on the 200 flickr1k photos the photo teacher (benchmarks/quality_real.py:
    EfficientNet-Lite0 + MiniLM, heads tuned) held out: captions in each language query the photos,
    read by the photo teacher itself and by each student through the teacher's text head."""
    from quality_real import flickr_split

    from distill import load_student
    from distill.eval import cross_lingual_recall, embed_images, embed_texts

    photo = load_student(photo_dir).eval()
    _, held = flickr_split(ASSETS)
    held_photos = sorted({os.path.realpath(p) for p in held.images})
    images = embed_images(photo, held_photos)
    sets = {"en": english, **queries}
    out = {"teacher": str(photo_dir), "photos": len(held_photos), "languages": {}}
    # the students learnt MiniLM's sentence embedding, which the photo teacher's text head maps into its space
    models = {"teacher": photo, **{k: m.into_space_of(photo, "text") for k, m in students.items()}}
    keep = set(held_photos)
    for x, rows in sets.items():
        pairs = [(c, os.path.realpath(i)) for i, c in zip(rows.images, rows.captions)
                 if i and c and os.path.realpath(i) in keep]
        texts, groups = [c for c, _ in pairs], [g for _, g in pairs]
        out["languages"][x] = {"queries": len(texts)}
        for name, model in models.items():
            r = cross_lingual_recall(embed_texts(model, texts), groups, images, held_photos)
            out["languages"][x].update({f"{name}_t2i_r1": r["r1"], f"{name}_t2i_r5": r["r5"]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (tests): minutes become seconds")
    ap.add_argument("--parallel", default=str(ASSETS / "multi30k" / "parallel-train.csv"),
                    help="csv of parallel sentences: a column en and one per language")
    ap.add_argument("--lang", action="append", default=None, help="language column(s) of --parallel (default de, fr)")
    ap.add_argument("--eval", action="append", default=None,
                    help="image,caption file in that language over flickr1k photos (one per --lang, same order)")
    ap.add_argument("--english", default=str(ASSETS / "flickr1k" / "captions.csv"), help="the English captions")
    ap.add_argument("--limit", type=int, default=None, help="use the first N parallel rows")
    ap.add_argument("--work", default=None, help="keeps the cache, tokenizers and students between runs")
    ap.add_argument("--photo-teacher", default=None,
                    help="a photo-capable teacher (benchmarks/quality_real.py's tuned EfficientNet-Lite0 + MiniLM) for "
                         f"text->image R@1 on its held-out photos (default {PHOTO_TEACHER.relative_to(REPO)}, "
                         "skipped when absent)")
    ap.add_argument("--small", action="store_true",
                    help=f"shrink the student: vocabulary trimmed, FFN narrowed ({SMALL})")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = MODES[mode]
    langs = args.lang or ["de", "fr"]
    evals = args.eval or [str(ASSETS / "multi30k" / f"flickr1k-{x}.csv") for x in langs]
    if len(evals) != len(langs):
        raise SystemExit("give one --eval file per --lang")

    from distill import Distiller, create_student, load_teacher
    from distill.cache import TeacherService
    from distill.data import load_rows
    from distill.vocab import texts_of, train_tokenizer

    tic = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="multilingual_"))
    work.mkdir(parents=True, exist_ok=True)
    parallel = Path(args.parallel)
    if args.limit:
        lines = parallel.read_text(encoding="utf-8").splitlines()[: args.limit + 1]
        parallel = work / "parallel.csv"
        parallel.write_text("\n".join(lines) + "\n", encoding="utf-8")
    teacher = load_teacher("text:minilm")
    english = load_rows(args.english)
    queries = {x: load_rows(f) for x, f in zip(langs, evals)}
    if mode == "smoke":  # a few photos: the whole pipeline in seconds
        photos = set(list(dict.fromkeys(english.images))[:20])
        english = english.subset([i for i, p in enumerate(english.images) if p in photos])
        real = {os.path.realpath(p) for p in photos}
        queries = {x: q.subset([i for i, p in enumerate(q.images) if p and os.path.realpath(p) in real])
                   for x, q in queries.items()}
    timing = {}

    # tokenizers: the other languages' pieces for MiniLM (uncased, as MiniLM is), and one for a student from scratch
    t0 = time.perf_counter()
    grow_dir, scratch_dir = work / "tok_grow", work / "tok_scratch"
    if not (grow_dir / "tokenizer.json").exists():
        train_tokenizer(texts_of([str(parallel)], langs), cfg["vocab"], lowercase=True).save_pretrained(grow_dir)
    if not (scratch_dir / "tokenizer.json").exists():
        train_tokenizer(texts_of([str(parallel)], ["en", *langs]), cfg["scratch_vocab"]).save_pretrained(scratch_dir)
    timing["tokenizers_s"] = time.perf_counter() - t0

    common = dict(parallel_source="en", parallel_targets=langs, group_by_length=True, num_workers=0,
                  progress=mode != "smoke",
                  health_every=0, warmup_steps=max(1, cfg["steps"] // 20), checkpoint_every=max(1, cfg["steps"] // 4),
                  resume=True, loss_weights={"cosine": 1.0, "contrastive": 1.0},
                  loss_kwargs={"contrastive": {"queue": cfg["queue"]}} if cfg["queue"] else {})
    service = TeacherService(teacher, work / "cache", num_workers=0, progress=mode != "smoke")
    results, params, students = {}, {"teacher": _params(teacher)}, {}
    t0 = time.perf_counter()
    evaluation = Evaluation(teacher, queries, english)
    timing["teacher_eval_s"] = time.perf_counter() - t0
    for name, kwargs, steps, batch, lr in (
            ("student", {"pretrained": "minilm", "keep_layers": cfg["layers"], "extend_vocab": str(grow_dir),
                         **({**SMALL, "train_text": str(parallel)} if args.small else {})},
             cfg["steps"], cfg["batch"], cfg["lr"]),
            ("scratch", {"tokenizer": str(scratch_dir), "num_layers": 4, "hidden_size": 256},
             cfg["scratch_steps"], cfg["scratch_batch"], cfg["scratch_lr"])):
        t0 = time.perf_counter()
        torch.manual_seed(0)
        student = create_student("bert_small", embed_dim=teacher.embed_dim, context_length=cfg["context"], **kwargs)
        params[name] = _params(student)
        r = Distiller(service, student, output_dir=str(work / name), max_steps=steps, batch_size=batch, lr=lr,
                      **common).fit(str(parallel))
        timing[f"{name}_train_s"] = time.perf_counter() - t0
        timing[f"{name}_captions_per_s"] = r.extra["samples_per_s"]
        t0 = time.perf_counter()
        students[name] = r.student.eval()
        results[name] = evaluation(students[name])
        timing[f"{name}_eval_s"] = time.perf_counter() - t0
    res = results["student"]
    photo_dir = Path(args.photo_teacher) if args.photo_teacher else PHOTO_TEACHER if mode != "smoke" else None
    if args.photo_teacher and not (photo_dir / "config.json").exists():
        raise SystemExit(f"--photo-teacher {photo_dir}: no saved model there (config.json)")
    if photo_dir is not None and (photo_dir / "config.json").exists():
        t0 = time.perf_counter()
        res["photos"] = photo_retrieval(photo_dir, students, queries, english)
        timing["photo_eval_s"] = time.perf_counter() - t0
    elif mode != "smoke":
        print(f"no photo teacher at {photo_dir} (run benchmarks/quality_real.py --quick first): text->image skipped")
    res["scratch"] = {"languages": results["scratch"]["languages"], "english": results["scratch"]["english"]}
    wall = time.perf_counter() - tic
    print(f"\nteacher MiniLM-L6 ({params['teacher'] / 1e6:.1f}M params); student from MiniLM's blocks "
          f"{cfg['layers']} + grown vocabulary ({params['student'] / 1e6:.1f}M); from scratch "
          f"({params['scratch'] / 1e6:.1f}M)")
    print(f"{'queries':10} {'teacher R@1':>11} {'R@5':>6} {'student R@1':>11} {'R@5':>6} {'scratch R@1':>11}")
    for lang in langs:
        a, b = res["languages"][lang], res["scratch"]["languages"][lang]
        print(f"{lang + '->en':10} {a['teacher_r1']:11.3f} {a['teacher_r5']:6.3f} {a['student_r1']:11.3f} "
              f"{a['student_r5']:6.3f} {b['student_r1']:11.3f}")
    e = res["english"]
    print(f"{'en->en':10} {e['teacher_r1']:11.3f} {'':6} {e['student_r1']:11.3f} {'':6} "
          f"{res['scratch']['english']['student_r1']:11.3f}")
    if "photos" in res:
        p = res["photos"]
        print(f"\ntext->image on the {p['photos']} photos the photo teacher held out ({p['teacher']}); students "
              "through its text head")
        print(f"{'queries':10} {'n':>5} {'teacher R@1':>11} {'R@5':>6} {'student R@1':>11} {'R@5':>6} {'scratch R@1':>11}")
        for x, v in p["languages"].items():
            print(f"{x + '->img':10} {v['queries']:5d} {v['teacher_t2i_r1']:11.3f} {v['teacher_t2i_r5']:6.3f} "
                  f"{v['student_t2i_r1']:11.3f} {v['student_t2i_r5']:6.3f} {v['scratch_t2i_r1']:11.3f}")
    print(f"{wall / 60:.1f} min in all ({', '.join(f'{k} {v:.0f}' for k, v in timing.items())})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"multilingual{'_' + mode if mode != 'full' else ''}{'_small' if args.small else ''}"
    write_result(name, device, args.out, ("transformers",), mode=mode, small=SMALL if args.small else None,
                 parallel=str(args.parallel), langs=langs, settings=cfg, params=params, timing=timing,
                 wall_s=wall, **res)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
