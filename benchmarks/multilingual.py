"""Text students for captions the teacher cannot read (issue 17): one student for English and other languages.

The teacher is the English MiniLM-L6 (``text:minilm``). The student starts from MiniLM's first layers with
its vocabulary grown by a tokenizer trained on the other languages (``distill tokenizer train`` +
``student.kwargs.extend_vocab``), and learns parallel sentences: its embedding of each ``xx`` sentence and
of the ``en`` one regress (cosine) and contrast onto the teacher's embedding of the ``en`` sentence
(multilingual knowledge distillation). A second student starts from scratch on a tokenizer trained on the
captions. Evaluation: a caption in language xx of a flickr1k photo queries the 5,000 English captions (a hit
when the caption it retrieves belongs to that photo), and English caption->caption R@1 stays in view.

    python benchmarks/multilingual.py --quick                     # 2 CPU cores, < 30 min: German and French
    python benchmarks/multilingual.py --parallel my.csv --lang vi --eval flickr1k-vi.csv --out results/vi
        # any language: my.csv has columns en and vi; flickr1k-vi.csv is image,caption over flickr1k photos

Writes ``<out>/multilingual[_quick]_<device>.json`` with ``languages: {xx: {student_r1, student_r5, teacher_r1,
teacher_r5}}`` and ``english: {student_r1, teacher_r1}``.
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

MODES = {
    "quick": {"layers": 4, "vocab": 8000, "steps": 1400, "batch": 64, "lr": 2e-4, "context": 40,
              "scratch_steps": 700, "scratch_batch": 64, "scratch_lr": 5e-4, "scratch_vocab": 12000, "queue": 1024},
    "full": {"layers": 5, "vocab": 12000, "steps": 20000, "batch": 256, "lr": 2e-4, "context": 64,
             "scratch_steps": 20000, "scratch_batch": 256, "scratch_lr": 5e-4, "scratch_vocab": 24000, "queue": 4096},
    "smoke": {"layers": 1, "vocab": 300, "steps": 4, "batch": 8, "lr": 2e-4, "context": 24,
              "scratch_steps": 3, "scratch_batch": 8, "scratch_lr": 5e-4, "scratch_vocab": 300, "queue": 0},
}


def _params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def evaluate(teacher, student, queries: dict, english) -> dict:
    from distill.eval import caption_retrieval, cross_lingual, embed_texts

    out = {"languages": {}, "english": {}}
    for lang, rows in queries.items():
        r = cross_lingual(teacher, student, rows, english)
        out["languages"][lang] = {"student_r1": r["student"]["r1"], "student_r5": r["student"]["r5"],
                                  "teacher_r1": r["teacher"]["r1"], "teacher_r5": r["teacher"]["r5"]}
    groups = [p for p, c in zip(english.images, english.captions) if p and c]
    texts = [c for p, c in zip(english.images, english.captions) if p and c]
    for name, model in (("teacher", teacher), ("student", student)):
        out["english"][f"{name}_r1"] = caption_retrieval(embed_texts(model, texts), groups, ks=(1,))["r1"]
    return out


def main() -> None:
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
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
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

    common = dict(parallel_source="en", parallel_targets=langs, num_workers=0, progress=mode != "smoke",
                  health_every=0, warmup_steps=max(1, cfg["steps"] // 20), checkpoint_every=max(1, cfg["steps"] // 4),
                  resume=True, loss_weights={"cosine": 1.0, "contrastive": 1.0},
                  loss_kwargs={"contrastive": {"queue": cfg["queue"]}} if cfg["queue"] else {})
    service = TeacherService(teacher, work / "cache", num_workers=0, progress=mode != "smoke")
    results, params = {}, {"teacher": _params(teacher)}
    for name, kwargs, steps, batch, lr in (
            ("student", {"pretrained": "minilm", "num_layers": cfg["layers"], "extend_vocab": str(grow_dir)},
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
        results[name] = evaluate(teacher, r.student.eval(), queries, english)
    res = results["student"]
    res["scratch"] = {"languages": results["scratch"]["languages"], "english": results["scratch"]["english"]}
    wall = time.perf_counter() - tic
    print(f"\nteacher MiniLM-L6 ({params['teacher'] / 1e6:.1f}M params); student from MiniLM's first "
          f"{cfg['layers']} layers + grown vocabulary ({params['student'] / 1e6:.1f}M); from scratch "
          f"({params['scratch'] / 1e6:.1f}M)")
    print(f"{'queries':10} {'teacher R@1':>11} {'R@5':>6} {'student R@1':>11} {'R@5':>6} {'scratch R@1':>11}")
    for lang in langs:
        a, b = res["languages"][lang], res["scratch"]["languages"][lang]
        print(f"{lang + '->en':10} {a['teacher_r1']:11.3f} {a['teacher_r5']:6.3f} {a['student_r1']:11.3f} "
              f"{a['student_r5']:6.3f} {b['student_r1']:11.3f}")
    e = res["english"]
    print(f"{'en->en':10} {e['teacher_r1']:11.3f} {'':6} {e['student_r1']:11.3f} {'':6} "
          f"{res['scratch']['english']['student_r1']:11.3f}")
    print(f"{wall / 60:.1f} min in all ({', '.join(f'{k} {v:.0f}' for k, v in timing.items())})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result(f"multilingual{'_' + mode if mode != 'full' else ''}", device, args.out, ("transformers",),
                 mode=mode, parallel=str(args.parallel), langs=langs, settings=cfg, params=params, timing=timing,
                 wall_s=wall, **res)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
