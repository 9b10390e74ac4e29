"""How to start and batch a shallower text student (``student.kwargs.keep_layers``, ``data.group_by_length``).

1. Blocks kept: MiniLM-L6 cut to a few of its blocks, with no training at all (the projection head starts as
   the identity), retrieves English flickr1k captions: each of the 5,000 queries the other 4,999, a hit when
   the caption it finds describes the same photo. The closer this start is to the teacher, the less
   distillation has to undo.
2. Batches: the student of ``multilingual.py --quick`` (MiniLM blocks 0-3 and 5, vocabulary grown for German
   and French) trained on Multi30k en/de/fr sentences with random batches and with length-grouped ones,
   alternated ``--rounds`` times in this one run: captions/s (medians) and the mean padded batch length.

    python benchmarks/text_students.py            # 2 CPU cores: ~6 minutes

Writes ``results/text_students_<device>.json``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
CHOICES = ([0, 1, 2, 3], [0, 1, 3, 5], [0, 2, 4, 5], [0, 1, 2, 3, 4], [0, 1, 2, 3, 5], [0, 2, 3, 4, 5])
STUDENT = {"pretrained": "minilm", "keep_layers": [0, 1, 2, 3, 5], "context_length": 40}


def blocks_kept(captions: str) -> dict:
    from distill import create_student, load_teacher
    from distill.data import load_rows
    from distill.eval import caption_retrieval, embed_texts

    rows = load_rows(captions)
    pairs = [(p, c) for p, c in zip(rows.images, rows.captions) if p and c]
    groups, texts = [p for p, _ in pairs], [c for _, c in pairs]
    teacher = load_teacher("text:minilm")
    recall = lambda model: caption_retrieval(embed_texts(model, texts), groups, ks=(1, 5))  # noqa: E731
    out = {"queries": len(texts), "teacher": recall(teacher), "students": []}
    print(f"\nEnglish caption->caption before any training ({len(texts)} flickr1k captions)")
    print(f"{'blocks kept':18} {'R@1':>6} {'R@5':>6}\n{'all 6 (teacher)':18} {out['teacher']['r1']:6.3f} "
          f"{out['teacher']['r5']:6.3f}")
    for keep in CHOICES:
        student = create_student("bert_small", embed_dim=teacher.embed_dim, pretrained="minilm", keep_layers=keep)
        r = recall(student.eval())
        out["students"].append({"keep_layers": keep, **r})
        print(f"{str(keep):18} {r['r1']:6.3f} {r['r5']:6.3f}", flush=True)
    return out


def batching(parallel: str, rows: int, steps: int, batch: int, rounds: int) -> dict:
    import numpy as np

    from distill import Distiller, create_student, load_teacher
    from distill.cache import TeacherService
    from distill.data import EpochBatchSampler, load_parallel
    from distill.vocab import texts_of, train_tokenizer

    work = Path(tempfile.mkdtemp(prefix="text_students_"))
    lines = Path(parallel).read_text(encoding="utf-8").splitlines()[: rows + 1]
    (work / "parallel.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    train_tokenizer(texts_of([str(work / "parallel.csv")], ["de", "fr"]), 8000, lowercase=True).save_pretrained(
        work / "tok")
    teacher = load_teacher("text:minilm")
    service = TeacherService(teacher, work / "cache", num_workers=0, progress=False)

    def student():
        torch.manual_seed(0)
        return create_student("bert_small", embed_dim=teacher.embed_dim, extend_vocab=str(work / "tok"), **STUDENT)

    sentences = load_parallel(work / "parallel.csv", "en", ["de", "fr"])
    lengths = np.asarray(student().token_counts(sentences.captions))
    padded = {}
    for grouped in (False, True):
        sampler = iter(EpochBatchSampler(len(lengths), batch, lengths=lengths if grouped else None))
        padded[grouped] = float(np.mean([min(40, lengths[[i % len(lengths) for i in next(sampler)]].max())
                                         for _ in range(200)]))
    speed: dict[bool, list[float]] = {False: [], True: []}
    for k in range(rounds):
        for grouped in (False, True):
            r = Distiller(service, student(), output_dir=str(work / f"run_{k}_{grouped}"), max_steps=steps,
                          batch_size=batch, lr=2e-4, parallel_source="en", parallel_targets=["de", "fr"],
                          group_by_length=grouped, num_workers=0, progress=False, health_every=0,
                          warmup_steps=1).fit(str(work / "parallel.csv"))
            speed[grouped].append(r.extra["samples_per_s"])
            print(f"round {k + 1}: {'grouped' if grouped else 'random '} {speed[grouped][-1]:.1f} captions/s",
                  flush=True)
    out = {"rows": rows, "sentences": len(lengths), "steps": steps, "batch": batch, "rounds": rounds,
           "mean_tokens": float(lengths.mean()),
           "random": {"captions_per_s": statistics.median(speed[False]), "all": speed[False],
                      "padded_length": padded[False]},
           "grouped": {"captions_per_s": statistics.median(speed[True]), "all": speed[True],
                       "padded_length": padded[True]}}
    out["speedup"] = out["grouped"]["captions_per_s"] / out["random"]["captions_per_s"]
    print(f"\n{len(lengths)} sentences, {lengths.mean():.1f} tokens on average; batches of {batch}, {steps} steps, "
          f"medians of {rounds} alternated rounds")
    print(f"{'batches':10} {'padded to':>9} {'captions/s':>10}")
    for name in ("random", "grouped"):
        print(f"{name:10} {out[name]['padded_length']:9.1f} {out[name]['captions_per_s']:10.1f}")
    print(f"grouped / random: {out['speedup']:.2f}x")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", default=str(ASSETS / "flickr1k" / "captions.csv"))
    ap.add_argument("--parallel", default=str(ASSETS / "multi30k" / "parallel-train.csv"))
    ap.add_argument("--rows", type=int, default=3000, help="parallel rows (each gives en, de and fr sentences)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    tic = time.perf_counter()
    result = {"blocks_kept": blocks_kept(args.captions),
              "batching": batching(args.parallel, args.rows, args.steps, args.batch, args.rounds)}
    write_result("text_students", torch.device("cpu"), args.out, ("transformers",),
                 wall_s=time.perf_counter() - tic, **result)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
