"""How to start and batch a shallower text student (``student.kwargs.keep_layers``, ``data.group_by_length``).

1. Blocks kept: MiniLM-L6 cut to a few of its blocks, with no training at all (the projection head starts as
   the identity), retrieves English flickr1k captions: each of the 5,000 queries the other 4,999, a hit when
   the caption it finds describes the same photo. The closer this start is to the teacher, the less
   distillation has to undo.
2. Batches: the student of ``multilingual.py --quick`` (MiniLM blocks 0-3 and 5, vocabulary grown for German
   and French) trained on Multi30k en/de/fr sentences with random batches and with length-grouped ones,
   alternated ``--rounds`` times in this one run: captions/s (medians) and the mean padded batch length.

3. Compression (``--compression``, issue 29): English text students far smaller than MiniLM-L6, each from its
   blocks (``keep_layers``), narrowed with the weights of its most important heads, neurons and hidden dimensions
   (``hidden_size`` / ``intermediate_size``) and a vocabulary trimmed to the training text's tokens
   (``trim_vocab``), then distilled on the corpus (Flickr8k captions of photos outside flickr1k + Multi30k
   English; never the flickr1k captions). Scored as in 1 (caption -> caption R@1/R@5 on the 5,000 flickr1k
   captions), with fidelity (mean cosine to the teacher), encoding speed at batch 256 and batch-1 latency (all
   models timed side by side), and the ONNX INT8 export's R@1. ``--eval-captions FILE`` (csv ``group,caption``)
   adds the same recall on another caption set.

    python benchmarks/text_students.py            # 2 CPU cores: ~6 minutes
    python benchmarks/text_students.py --compression --quick   # < 30 minutes

Writes ``results/text_students_<device>.json`` (``results/text_compression[_quick]_<device>.json``).
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


# name -> bert_small kwargs on top of pretrained MiniLM; each under a parameter budget (MiniLM-L6: 22.7M)
COMPRESSION = {
    "quick": {"steps": 1500, "batch": 64, "lr": 3e-4, "context": 40, "queue": 1024, "corpus_rows": None,
              "students": {
                  # speed follows the blocks' width and depth, size mostly the vocabulary: "third" spends its
                  # parameters on every token of the corpus and narrows its blocks for 3x MiniLM's speed
                  "third": {"keep_layers": [0, 1, 3, 5], "hidden_size": 288, "intermediate_size": 768,
                            "trim_vocab": True, "min_token_count": 1},
                  "sixth": {"keep_layers": [0, 2, 5], "hidden_size": 256, "intermediate_size": 768,
                            "trim_vocab": True, "min_token_count": 3}}},
    "smoke": {"steps": 3, "batch": 8, "lr": 3e-4, "context": 24, "queue": 0, "corpus_rows": 200,
              "students": {"tiny": {"keep_layers": [5], "hidden_size": 64, "intermediate_size": 64,
                                    "trim_vocab": True}}},
}


def corpus(work: Path, rows: int | None, test: list[str]) -> Path:
    """The training text as a ``caption`` csv: Flickr8k captions of the photos outside flickr1k and Multi30k's
    English sentences, less any sentence that is also a test caption (a few dozen generic ones, such as "a dog
    runs through the grass", describe other photos too)."""
    import csv

    out = work / "corpus.csv"
    if not out.exists():
        with open(ASSETS / "flickr8k-text-only.csv", encoding="utf-8") as f:
            texts = [r["caption"] for r in csv.DictReader(f)]
        with open(ASSETS / "multi30k" / "parallel-train.csv", encoding="utf-8") as f:
            texts += [r["en"] for r in csv.DictReader(f)]
        held = {t.strip().lower() for t in test}
        texts = [t.strip() for t in texts if t and t.strip() and t.strip().lower() not in held][:rows]
        tmp = out.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f)
            w.writerow(["caption"])
            w.writerows([t] for t in texts)
        tmp.replace(out)
    return out


def caption_groups(path: str) -> tuple[list[str], list[str]]:
    """(captions, groups) of a caption file: ``image,caption`` (a photo is a group) or ``group,caption``."""
    import csv

    from distill.data import read_text_file

    reader = csv.DictReader(read_text_file(path).splitlines())
    key = "group" if "group" in (reader.fieldnames or []) else "image"
    if key not in (reader.fieldnames or []) or "caption" not in reader.fieldnames:
        raise SystemExit(f"{path}: needs columns group (or image) and caption; has {reader.fieldnames}")
    pairs = [(r["caption"].strip(), r[key]) for r in reader if (r.get("caption") or "").strip() and r.get(key)]
    return [c for c, _ in pairs], [g for _, g in pairs]


def compression(mode: str, captions: str, extra: list[str], work: Path, out_dir: str, workers: int) -> dict:
    from distill import Distiller, create_student, load_teacher
    from distill.cache import TeacherService
    from distill.eval import caption_retrieval, embed_texts
    from distill.export import export
    from distill.runtime import OnnxStudent
    from distill.timing import compare

    cfg = COMPRESSION[mode]
    tic = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    texts, groups = caption_groups(captions)
    train = corpus(work, cfg["corpus_rows"], texts)
    if mode == "smoke":
        texts, groups = texts[:100], groups[:100]
    sets = {"flickr1k": (texts, groups), **{Path(f).stem: caption_groups(f) for f in extra}}
    teacher = load_teacher("text:minilm").eval()
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    emb_params = lambda m: next(x.weight.numel() for n, x in m.named_modules()  # noqa: E731
                                if n.endswith("word_embeddings"))
    teacher_emb = embed_texts(teacher, texts)
    result = {"teacher": {"params": params(teacher), **caption_retrieval(teacher_emb, groups, ks=(1, 5))},
              "students": {}, "extra": {}, "settings": {k: v for k, v in cfg.items() if k != "students"},
              "corpus": {"file": str(train), "texts": sum(1 for _ in open(train, encoding="utf-8")) - 1},
              "timing": {}}
    result["teacher"]["embedding_params"] = emb_params(teacher)
    print(f"teacher MiniLM-L6: {result['teacher']['params'] / 1e6:.2f}M params, R@1 {result['teacher']['r1']:.3f}",
          flush=True)
    service = TeacherService(teacher, work / "cache", num_workers=0, progress=mode != "smoke")
    students = {}
    for name, opts in cfg["students"].items():
        t0 = time.perf_counter()
        torch.manual_seed(0)
        student = create_student("bert_small", embed_dim=teacher.embed_dim, pretrained="minilm",
                                 context_length=cfg["context"], train_text=str(train), **opts)
        start = caption_retrieval(embed_texts(student.eval(), texts), groups, ks=(1,))["r1"]
        r = Distiller(service, student, output_dir=str(work / name), max_steps=cfg["steps"], batch_size=cfg["batch"],
                      lr=cfg["lr"], group_by_length=True, num_workers=0, progress=mode != "smoke", health_every=0,
                      warmup_steps=max(1, cfg["steps"] // 20), checkpoint_every=max(1, cfg["steps"] // 4),
                      resume=True, loss_weights={"cosine": 1.0, "contrastive": 1.0},
                      loss_kwargs={"contrastive": {"queue": cfg["queue"]}} if cfg["queue"] else {}).fit(str(train))
        student = r.student.eval()
        students[name] = student
        emb = embed_texts(student, texts)
        rec = caption_retrieval(emb, groups, ks=(1, 5))
        spec = student.text.spec
        result["students"][name] = {
            "options": opts, "params": params(student), "embedding_params": emb_params(student),
            "params_vs_teacher": params(student) / result["teacher"]["params"], "r1_before_training": start,
            **rec, "kept": rec["r1"] / result["teacher"]["r1"],
            "fidelity": float((emb * teacher_emb).sum(-1).mean()),
            "vocab": spec.get("trimmed_vocab"), "narrowed": spec.get("narrowed"),
            "train_s": time.perf_counter() - t0, "train_captions_per_s": r.extra["samples_per_s"]}
        t0 = time.perf_counter()
        folder = work / f"{name}_int8"
        export(student, folder, "onnx-int8", data=str(captions) if mode != "smoke" else None, overwrite=True)
        result["students"][name]["onnx_int8_r1"] = caption_retrieval(
            torch.as_tensor(OnnxStudent(folder).encode_text(texts)), groups, ks=(1,))["r1"]
        result["timing"][f"{name}_int8_s"] = time.perf_counter() - t0
        s = result["students"][name]
        print(f"{name}: {s['params'] / 1e6:.2f}M params ({s['params_vs_teacher']:.2f} of the teacher), R@1 "
              f"{s['r1_before_training']:.3f} before training -> {s['r1']:.3f} ({s['kept']:.1%} of the teacher), "
              f"INT8 {s['onnx_int8_r1']:.3f}", flush=True)
    # speed: every model timed side by side, batch 256 and batch 1 (real captions, torch threads as set)
    models = {"teacher": teacher, **students}
    batch = texts[:256]
    with torch.no_grad():
        b256 = compare({n: (lambda m=m: m.encode_text(batch)) for n, m in models.items()}, rounds=5)
        b1 = compare({n: (lambda m=m: m.encode_text(batch[:1])) for n, m in models.items()}, rounds=9)
    for n in models:
        entry = result["teacher"] if n == "teacher" else result["students"][n]
        entry["captions_per_s_b256"] = len(batch) / b256[n]
        entry["latency_ms_b1"] = 1000 * b1[n]
    for n in students:
        s = result["students"][n]
        s["speedup_b256"] = s["captions_per_s_b256"] / result["teacher"]["captions_per_s_b256"]
        s["latency_vs_teacher_b1"] = s["latency_ms_b1"] / result["teacher"]["latency_ms_b1"]
    for stem, (t, g) in list(sets.items())[1:]:
        result["extra"][stem] = {n: caption_retrieval(embed_texts(m, t), g, ks=(1, 5)) for n, m in models.items()}
    result["wall_s"] = time.perf_counter() - tic
    print(f"\n{'model':10} {'params':>8} {'emb':>7} {'R@1':>6} {'R@5':>6} {'kept':>6} {'fidelity':>8} {'INT8 R@1':>8} "
          f"{'capt/s b256':>11} {'ms b1':>7}")
    for n in models:
        e = result["teacher"] if n == "teacher" else result["students"][n]
        print(f"{n:10} {e['params'] / 1e6:7.2f}M {e.get('embedding_params', 0) / 1e6:6.2f}M {e['r1']:6.3f} "
              f"{e['r5']:6.3f} {e.get('kept', 1):6.1%} {e.get('fidelity', 1):8.3f} {e.get('onnx_int8_r1', 0):8.3f} "
              f"{e['captions_per_s_b256']:11.0f} {e['latency_ms_b1']:7.2f}")
    for stem, rows in result["extra"].items():
        print(f"{stem}: " + ", ".join(f"{n} R@1 {v['r1']:.3f}" for n, v in rows.items()))
    third, sixth = (result["students"].get(k) for k in ("third", "sixth"))
    if third and sixth:
        t = result["teacher"]
        result["targets"] = {
            "third": third["params"] <= t["params"] / 3 and third["r1"] >= 0.95 * t["r1"]
            and abs(third["onnx_int8_r1"] - third["r1"]) <= 0.01,
            "sixth": sixth["params"] <= t["params"] / 6 and sixth["r1"] >= 0.90 * t["r1"],
            "speed": all(s["speedup_b256"] >= 3 and s["latency_vs_teacher_b1"] < 1 for s in (third, sixth))}
        print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in result["targets"].items()))
    write_result(f"text_compression{'_' + mode if mode != 'full' else ''}", torch.device("cpu"), out_dir,
                 ("transformers",), mode=mode, **result)
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--captions", default=str(ASSETS / "flickr1k" / "captions.csv"))
    ap.add_argument("--parallel", default=str(ASSETS / "multi30k" / "parallel-train.csv"))
    ap.add_argument("--rows", type=int, default=3000, help="parallel rows (each gives en, de and fr sentences)")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--compression", action="store_true", help="part 3 only: small students, trimmed and narrowed")
    ap.add_argument("--quick", action="store_true", help="with --compression: the < 30 minute settings (default)")
    ap.add_argument("--smoke", action="store_true", help="with --compression: tiny settings (tests)")
    ap.add_argument("--eval-captions", action="append", default=[],
                    help="with --compression: another caption set (csv group,caption) scored the same way")
    ap.add_argument("--work", default=None, help="with --compression: keeps the cache and students between runs")
    args = ap.parse_args(argv)
    if args.compression:
        mode = "smoke" if args.smoke else "quick"
        work = Path(args.work or Path(__file__).resolve().parent.parent / "runs" / f"text_compression_{mode}")
        compression(mode, args.captions, args.eval_captions, work, args.out, 0)
        return
    tic = time.perf_counter()
    result = {"blocks_kept": blocks_kept(args.captions),
              "batching": batching(args.parallel, args.rows, args.steps, args.batch, args.rounds)}
    write_result("text_students", torch.device("cpu"), args.out, ("transformers",),
                 wall_s=time.perf_counter() - tic, **result)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
