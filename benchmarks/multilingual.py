"""Text students for captions the teacher cannot read (issues 17, 28): one student for English and other languages.

The teacher is the English MiniLM-L6 (``text:minilm``). The student starts from MiniLM's blocks 0-3 and its last
(``student.kwargs.keep_layers``), with its vocabulary grown by a tokenizer trained on the other languages
(``distill tokenizer train`` + ``student.kwargs.extend_vocab``) and each non-ASCII piece started at the English
pieces it translates to in the parallel text (``student.kwargs.align_vocab``). It learns parallel sentences: its
embedding of each ``xx`` sentence and of the ``en`` one regress (cosine) and contrast onto the teacher's
embedding of the ``en`` sentence (multilingual knowledge distillation). With the default languages it also
learns each language's own captions of the photos the photo teacher trained on, beside the English captions of
the same photos (``distill data pair``; ``--no-by-photo`` leaves them out). A second student starts from
scratch on a tokenizer trained on the captions. Evaluation: a caption in language xx queries the 5,000 English
captions (a hit when the caption it retrieves belongs to its photo; with the photo pairs, only the captions of
the held-out photos query), and English caption->caption R@1 stays in view. With the photo teacher of
``quality_real.py`` (EfficientNet-Lite0 + MiniLM, heads tuned), captions in each language also query the 200
photos it held out, the students through its text head. Batches group sentences by length.

    python benchmarks/multilingual.py --quick                     # 2 CPU cores, < 35 min: de, fr and zh
        # the student at most 0.55 of MiniLM's size: its vocabulary trimmed to the training text's tokens,
        # its FFN narrowed (student.kwargs.trim_vocab, intermediate_size); --no-small keeps full width
    python benchmarks/multilingual.py --parallel my.csv --lang vi --eval flickr1k-vi.csv --out results/vi
        # any language: my.csv has columns en and vi; flickr1k-vi.csv is image,caption over flickr1k photos
    python benchmarks/multilingual.py --quick --captions flickr1k-zh.csv --lang zh
        # captions only: no English, no parallel text; the photos are the dictionary

Writes ``<out>/multilingual[_quick][_small]_<device>.json`` with ``languages: {xx: {student_r1, student_r5,
teacher_r1, teacher_r5}}``, ``english: {student_r1, teacher_r1}``, ``photos: {languages: {xx: {teacher_t2i_r1,
...}}}`` and ``tokenizers``; ``--captions``: ``multilingual_captions_<xx>[_quick]_<device>.json``.
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
    "quick": {"layers": [0, 1, 2, 3, 5], "vocab": 8000, "steps": 4000, "batch": 64, "lr": 2e-4, "context": 40,
              "scratch_steps": 700, "scratch_batch": 64, "scratch_lr": 5e-4, "scratch_vocab": 12000, "queue": 1024,
              "captions_steps": 1500, "captions_lr": 2e-4},
    "full": {"layers": [0, 1, 2, 3, 5], "vocab": 12000, "steps": 20000, "batch": 256, "lr": 2e-4, "context": 64,
             "scratch_steps": 20000, "scratch_batch": 256, "scratch_lr": 5e-4, "scratch_vocab": 24000, "queue": 4096,
             "captions_steps": 3000, "captions_lr": 1e-4},
    "smoke": {"layers": [5], "vocab": 300, "steps": 4, "batch": 8, "lr": 2e-4, "context": 24,
              "scratch_steps": 3, "scratch_batch": 8, "scratch_lr": 5e-4, "scratch_vocab": 300, "queue": 0,
              "captions_steps": 3, "captions_lr": 1e-4},
}


# --small: the student's vocabulary trimmed to the parallel text's tokens (twice or more), its FFN narrowed from
# 1536 to 768 neurons (the ones with the most effect on MiniLM's output over that text)
SMALL = {"trim_vocab": True, "min_token_count": 2, "intermediate_size": 768}


# the languages a run learns by default: name -> (parallel file with an en column, its captions of flickr1k photos)
LANGUAGES = {"de": ("multi30k/parallel-train.csv", "multi30k/flickr1k-de.csv"),
             "fr": ("multi30k/parallel-train.csv", "multi30k/flickr1k-fr.csv"),
             "zh": ("flickr8k-cn/parallel-train.csv", "flickr8k-cn/flickr1k-zh.csv")}
# text written in a language by its speakers, for the tokenizer table's [UNK] share (never trained on)
CORPORA = {"zh": "flickr8k-cn/captions-zh.csv"}


def merge_parallel(files: list[Path], out: Path, limit: int | None = None, extra: list[dict] = ()) -> Path:
    """Several parallel files (each with an en column) and ``extra`` rows as one csv over the union of their
    columns: a row leaves the languages its file lacks empty (empty cells are not trained on)."""
    import csv

    from distill.data import write_parallel

    table: list[dict] = []
    for f in files:
        with open(f, encoding="utf-8-sig", newline="") as fh:
            table += list(csv.DictReader(fh))[:limit]
    return write_parallel(table + list(extra), out)


def held_out_photos() -> list[str]:
    """The flickr1k photos quality_real.py's photo teacher held out (real paths, sorted)."""
    from quality_real import flickr_split

    return sorted({os.path.realpath(p) for p in flickr_split(ASSETS)[1].images})


def photo_pairs(english, queries: dict) -> tuple[list[dict], dict]:
    """Captions in each language of the photos the photo teacher trained on (not the ones it held out), each
    beside the English captions of the same photo (``distill.data.pair_by_image``): native text, where the
    parallel files are translations. Returns those rows, and each language's queries cut to the held-out photos."""
    from distill.data import pair_by_image

    held_photos = set(held_out_photos())

    def part(rows, keep_held: bool):
        return rows.subset([i for i, p in enumerate(rows.images) if p and (os.path.realpath(p) in held_photos)
                            == keep_held])

    table = pair_by_image(part(english, False), {x: part(q, False) for x, q in queries.items()})
    return table, {x: part(q, True) for x, q in queries.items()}


def captions_only(photo_dir: Path, train_file: str, test_file: str | None, lang: str, work: Path, cfg: dict,
                  progress: bool) -> dict:
    """A language with nothing but its own photos: a text student learns captions in ``lang`` onto the frozen
    photo teacher's embeddings of their photos (``data.text_target: image``), then its captions query the test
    photos. Without a test file (or the same file), the photos quality_real.py held out are the test photos."""
    from distill import Distiller, create_student, load_student, load_teacher
    from distill.cache import TeacherService
    from distill.data import load_rows
    from distill.eval import cross_lingual_recall, embed_images, embed_texts
    from distill.vocab import align_pieces_by_images, set_piece_embeddings, train_tokenizer

    key = os.path.realpath
    train = load_rows(train_file)
    if test_file and key(test_file) != key(train_file):
        test = load_rows(test_file)
    else:
        held_photos = set(held_out_photos())
        test = train.subset([i for i, p in enumerate(train.images) if p and key(p) in held_photos])
        train = train.subset([i for i, p in enumerate(train.images) if p and key(p) not in held_photos])
    test_photos = {key(p) for p in test.images if p}
    overlap = {key(p) for p in train.images if p} & test_photos
    if overlap:
        raise SystemExit(f"--captions and --eval share {len(overlap)} photos; test on photos never trained on")
    photo = load_student(photo_dir).eval()
    tok_dir = work / f"tok_captions_{lang}"
    if not (tok_dir / "tokenizer.json").exists():
        train_tokenizer([c for c in train.captions if c], cfg["vocab"], lowercase=True).save_pretrained(tok_dir)
    torch.manual_seed(0)
    # MiniLM (vocabulary grown for the language) followed by the photo teacher's text head: a start already in
    # the photo teacher's space, for English at least
    student = create_student("bert_small", embed_dim=384, pretrained="minilm", keep_layers=cfg["layers"],
                             extend_vocab=str(tok_dir), context_length=cfg["context"]).into_space_of(photo, "text")
    # the photos are the dictionary: each piece English cannot spell starts at the English words nearest the
    # photos its captions describe, in the photo teacher's space
    pairs = [(c, key(p)) for p, c in zip(train.images, train.captions) if p and c]
    train_photos = sorted({p for _, p in pairs})
    row_of = {p: k for k, p in enumerate(train_photos)}
    image_emb = embed_images(photo, train_photos)[[row_of[p] for _, p in pairs]]
    tok = student.text.tokenizer
    aligned = align_pieces_by_images(tok, [c for c, _ in pairs], image_emb, lambda words: embed_texts(photo, words),
                                     [i for t, i in tok.get_vocab().items() if not t.isascii()])
    set_piece_embeddings(student.text.encoder, aligned)
    service = TeacherService(load_teacher(str(photo_dir)), work / "photo_cache", num_workers=2, progress=progress)
    t0 = time.perf_counter()
    r = Distiller(service, student, output_dir=str(work / f"captions_{lang}"), max_steps=cfg["captions_steps"],
                  batch_size=cfg["batch"], lr=cfg["captions_lr"], text_target="image", group_by_length=True,
                  num_workers=0, progress=progress, health_every=0, resume=True,
                  warmup_steps=max(1, cfg["captions_steps"] // 20),
                  checkpoint_every=max(1, cfg["captions_steps"] // 2)).fit(train)
    train_s = time.perf_counter() - t0
    photos = sorted(test_photos)
    images = embed_images(photo, photos)
    pairs = [(c, key(p)) for p, c in zip(test.images, test.captions) if p and c]
    texts, groups = [c for c, _ in pairs], [g for _, g in pairs]
    s = cross_lingual_recall(embed_texts(r.student.eval(), texts), groups, images, photos)
    t = cross_lingual_recall(embed_texts(photo, texts), groups, images, photos)
    return {"student_r1": s["r1"], "student_r5": s["r5"], "teacher_r1": t["r1"], "teacher_r5": t["r5"],
            "photos": len(photos), "queries": len(texts), "train_captions": sum(1 for c in train.captions if c),
            "train_photos": len({p for p in train.images if p}), "train_s": train_s, "aligned_pieces": len(aligned)}


def tokenizer_table(models: dict, queries: dict, res: dict, corpora: dict | None = None) -> dict:
    """Per language, each model's tokenizer on that language's test captions: vocabulary size, [UNK] share,
    tokens per caption, and the model's caption R@1 (MiniLM's own vocabulary: the teacher); with a corpus of the
    language (``corpora``: language -> texts), the [UNK] share on it too."""
    from distill.vocab import token_counts, unk_share

    out: dict = {}
    for lang, rows in queries.items():
        texts = [c for c in rows.captions if c]
        out[lang] = {}
        for name, model in models.items():
            tok = model.text.tokenizer if getattr(model, "text", None) is not None else model.tokenizer
            counts = token_counts(tok, texts)
            total = sum(counts.values())
            scores = res["languages"][lang] if name != "scratch" else res["scratch"]["languages"][lang]
            out[lang][name] = {"vocab": len(tok), "unk_share": counts.get(tok.unk_token_id, 0) / max(total, 1),
                               "tokens_per_caption": total / max(len(texts), 1),
                               "r1": scores["teacher_r1" if name == "teacher" else "student_r1"]}
            if corpora and lang in corpora:
                out[lang][name]["corpus_unk_share"] = unk_share(tok, corpora[lang])
    return out


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


class PhotoJudge:
    """The photo teacher of benchmarks/quality_real.py (EfficientNet-Lite0 + MiniLM, heads tuned) and its
    embeddings of the 200 flickr1k photos it held out, loaded and computed once."""

    def __init__(self, photo_dir: Path):
        from distill import load_student
        from distill.eval import embed_images

        self.dir, self.model = photo_dir, load_student(photo_dir).eval()
        self.photos = held_out_photos()
        self.images = embed_images(self.model, self.photos)

    def recall(self, model, texts: list[str], groups: list[str]) -> dict:
        """Text->image R@1/R@5 of ``texts`` (``groups``: each one's photo) read by ``model``."""
        from distill.eval import cross_lingual_recall, embed_texts

        return cross_lingual_recall(embed_texts(model, texts), groups, self.images, self.photos)


def photo_retrieval(judge: PhotoJudge, students: dict, queries: dict, english) -> dict:
    """Text->image R@1/R@5 on the photos the photo teacher held out: captions in each language query the
    photos, read by the photo teacher itself and by each student through the teacher's text head."""
    sets = {"en": english, **queries}
    out = {"teacher": str(judge.dir), "photos": len(judge.photos), "languages": {}}
    # the students learnt MiniLM's sentence embedding, which the photo teacher's text head maps into its space
    models = {"teacher": judge.model, **{k: m.into_space_of(judge.model, "text") for k, m in students.items()}}
    keep = set(judge.photos)
    for x, rows in sets.items():
        pairs = [(c, os.path.realpath(i)) for i, c in zip(rows.images, rows.captions)
                 if i and c and os.path.realpath(i) in keep]
        texts, groups = [c for c, _ in pairs], [g for _, g in pairs]
        out["languages"][x] = {"queries": len(texts)}
        for name, model in models.items():
            r = judge.recall(model, texts, groups)
            out["languages"][x].update({f"{name}_t2i_r1": r["r1"], f"{name}_t2i_r5": r["r5"]})
    return out


def same_length(parallel: list[Path], student, queries: dict, evaluation: Evaluation, teacher,
                judge: PhotoJudge | None) -> dict:
    """What a query that short can say: per language, its queries' mean length in English words (its tokens
    per English word in the parallel files: translations), and the English teacher's R@1 when the English
    captions of the same photos, cut to that many words, query the full English captions (their own left out)
    and, with a photo teacher, its held-out photos. Queries far shorter than English captions say less."""
    import csv

    from distill.eval import embed_texts

    key = os.path.realpath
    tok = student.text.tokenizer
    table = []
    for f in parallel:
        with open(f, encoding="utf-8-sig", newline="") as fh:
            table += list(csv.DictReader(fh))
    gallery, groups, full = evaluation.texts, evaluation.groups, evaluation.teacher["en"]

    def r1_others(query_emb, own: list[int]) -> float:  # each query against every caption but its own
        sim = query_emb @ full.T
        sim[torch.arange(len(own)), torch.tensor(own)] = float("-inf")
        return sum(groups[t] == groups[k] for t, k in zip(sim.argmax(1).tolist(), own)) / max(len(own), 1)

    held = set(judge.photos) if judge is not None else set()
    out = {}
    for x, rows in queries.items():
        pairs = [(r[x], r["en"]) for r in table if r.get(x) and r.get("en")]
        per_word = sum(len(tok.tokenize(a)) for a, _ in pairs) / max(sum(len(b.split()) for _, b in pairs), 1)
        texts = [c for c in rows.captions if c]
        words = sum(len(tok.tokenize(c)) for c in texts) / max(len(texts), 1) / max(per_word, 1e-9)
        n = max(1, round(words))
        photos = {key(p) for p in rows.images if p}
        own = [k for k, g in enumerate(groups) if g in photos]
        cut = [" ".join(gallery[k].split()[:n]) for k in own]
        out[x] = {"english_words": words, "tokens_per_english_word": per_word, "cut_to": n,
                  "teacher_r1": r1_others(embed_texts(teacher, cut), own),
                  "teacher_r1_full_length": r1_others(full[own], own)}
        keep = [i for i, k in enumerate(own) if groups[k] in held]
        if keep:
            r = judge.recall(judge.model, [cut[i] for i in keep], [groups[own[i]] for i in keep])
            out[x].update({"photo_teacher_t2i_r1": r["r1"], "photo_teacher_t2i_r5": r["r5"]})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (tests): minutes become seconds")
    ap.add_argument("--parallel", default=None,
                    help="csv of parallel sentences: a column en and one per --lang (default: Multi30k en/de/fr "
                         "and Flickr8K-CN en/zh, merged)")
    ap.add_argument("--lang", action="append", default=None,
                    help=f"language column(s) of --parallel (default {', '.join(LANGUAGES)}); with --captions: the "
                         "captions' language")
    ap.add_argument("--eval", action="append", default=None,
                    help="image,caption file in that language over flickr1k photos (one per --lang, same order)")
    ap.add_argument("--english", default=str(ASSETS / "flickr1k" / "captions.csv"), help="the English captions")
    ap.add_argument("--limit", type=int, default=None, help="use the first N parallel rows")
    ap.add_argument("--work", default=None, help="keeps the cache, tokenizers and students between runs")
    ap.add_argument("--photo-teacher", default=None,
                    help="a photo-capable teacher (benchmarks/quality_real.py's tuned EfficientNet-Lite0 + MiniLM) for "
                         f"text->image R@1 on its held-out photos (default {PHOTO_TEACHER.relative_to(REPO)}, "
                         "skipped when absent)")
    ap.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                    help=f"shrink the student: vocabulary trimmed, FFN narrowed ({SMALL}); default in --quick")
    ap.add_argument("--by-photo", action=argparse.BooleanOptionalAction, default=None,
                    help="also learn each language's --eval captions of the photos the photo teacher trained on, "
                         "beside the English captions of the same photos (distill data pair), and query with the "
                         "held-out photos' captions only; default on with the default languages")
    ap.add_argument("--captions", default=None,
                    help="captions-only mode: an image,caption file in language --lang (no English, no parallel "
                         "text): a student learns them onto the photo teacher's embeddings of their photos; --eval "
                         "names the test file (default: the photos quality_real.py held out, from this file)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    cfg = MODES[mode]
    small = args.small if args.small is not None else mode == "quick"
    if args.captions:
        return main_captions_only(args, mode, cfg)
    langs = args.lang or list(LANGUAGES)
    if args.parallel is None and not set(langs) <= set(LANGUAGES):
        raise SystemExit(f"--lang {','.join(langs)}: give its parallel file with --parallel (and --eval)")
    evals = args.eval or [str(ASSETS / LANGUAGES[x][1]) for x in langs]
    if len(evals) != len(langs):
        raise SystemExit("give one --eval file per --lang")

    from distill import Distiller, create_student, load_teacher
    from distill.cache import TeacherService
    from distill.data import load_rows
    from distill.vocab import texts_of, train_tokenizer

    tic = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="multilingual_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.parallel:
        files = [Path(args.parallel)]
    else:
        files = [ASSETS / f for f in dict.fromkeys(LANGUAGES[x][0] for x in langs)]
    teacher = load_teacher("text:minilm")
    english = load_rows(args.english)
    queries = {x: load_rows(f) for x, f in zip(langs, evals)}
    by_photo = args.by_photo if args.by_photo is not None else (args.parallel is None and mode != "smoke")
    native: list[dict] = []
    if by_photo:
        native, queries = photo_pairs(english, queries)
    parallel = (merge_parallel(files, work / "parallel.csv", args.limit, native)
                if len(files) > 1 or args.limit or native else files[0])
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
                         "align_vocab": str(parallel),
                         **({**SMALL, "train_text": str(parallel)} if small else {})},
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
    judge = None
    if photo_dir is not None and (photo_dir / "config.json").exists():
        t0 = time.perf_counter()
        judge = PhotoJudge(photo_dir)
        res["photos"] = photo_retrieval(judge, students, queries, english)
        timing["photo_eval_s"] = time.perf_counter() - t0
    elif mode != "smoke":
        print(f"no photo teacher at {photo_dir} (run benchmarks/quality_real.py --quick first): text->image skipped")
    res["scratch"] = {"languages": results["scratch"]["languages"], "english": results["scratch"]["english"]}
    t0 = time.perf_counter()
    res["same_length"] = same_length(files, students["student"], queries, evaluation, teacher, judge)
    timing["same_length_s"] = time.perf_counter() - t0
    corpora = {x: texts_of([str(ASSETS / CORPORA[x])]) for x in langs
               if x in CORPORA and (ASSETS / CORPORA[x]).exists() and mode != "smoke"}
    res["tokenizers"] = tokenizer_table({"teacher": teacher, **students}, queries, res, corpora)
    wall = time.perf_counter() - tic
    print(f"\nteacher MiniLM-L6 ({params['teacher'] / 1e6:.1f}M params); student from MiniLM's blocks "
          f"{cfg['layers']} + grown vocabulary ({params['student'] / 1e6:.1f}M); from scratch "
          f"({params['scratch'] / 1e6:.1f}M)")
    if by_photo:
        print(f"the students also learnt {len(native)} pairs of captions of the photo teacher's training photos "
              "(distill data pair); queries: the captions of its held-out photos")
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
    for lang, rows in res["tokenizers"].items():
        corpus = f" ([UNK] also on {CORPORA[lang]})" if lang in corpora else ""
        print(f"\n{lang} tokenizers on its test captions{corpus}\n{'model':10} {'vocab':>7} {'[UNK]':>7} "
              f"{'corpus':>7} {'tok/caption':>11} {'R@1':>6}")
        for name, t in rows.items():
            print(f"{name:10} {t['vocab']:7d} {t['unk_share']:7.2%} "
                  f"{format(t['corpus_unk_share'], '7.2%') if 'corpus_unk_share' in t else '':>7} "
                  f"{t['tokens_per_caption']:11.1f} {t['r1']:6.3f}")
    print("\nwhat a query that short can say: the English captions of the same photos, cut to the queries' length "
          "in English words, read by the teachers")
    print(f"{'queries':10} {'words':>6} {'cut to':>6} {'en R@1':>7} {'(full)':>7} {'en->img R@1':>11}")
    for x, v in res["same_length"].items():
        img = f"{v['photo_teacher_t2i_r1']:11.3f}" if "photo_teacher_t2i_r1" in v else f"{'':11}"
        print(f"{x:10} {v['english_words']:6.1f} {v['cut_to']:6d} {v['teacher_r1']:7.3f} "
              f"{v['teacher_r1_full_length']:7.3f} {img}")
    print(f"{wall / 60:.1f} min in all ({', '.join(f'{k} {v:.0f}' for k, v in timing.items())})")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = f"multilingual{'_' + mode if mode != 'full' else ''}{'_small' if small else ''}"
    write_result(name, device, args.out, ("transformers",), mode=mode, small=SMALL if small else None,
                 parallel=[str(f) for f in files], langs=langs, settings=cfg, params=params, timing=timing,
                 by_photo={"pairs": len(native), "queries": "captions of the photo teacher's held-out photos"}
                 if by_photo else None,
                 wall_s=wall, **res)


def main_captions_only(args, mode: str, cfg: dict) -> None:
    """``--captions FILE --lang xx [--eval FILE]``: writes ``captions_only: {xx: {...}}``."""
    if not args.lang or len(args.lang) != 1:
        raise SystemExit("--captions: name the captions' language with one --lang")
    lang = args.lang[0]
    photo_dir = Path(args.photo_teacher) if args.photo_teacher else PHOTO_TEACHER
    if not (photo_dir / "config.json").exists():
        raise SystemExit(f"--photo-teacher {photo_dir}: no saved model there (run benchmarks/quality_real.py --quick)")
    tic = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="captions_only_"))
    work.mkdir(parents=True, exist_ok=True)
    res = captions_only(photo_dir, args.captions, (args.eval or [None])[0], lang, work, cfg, mode != "smoke")
    wall = time.perf_counter() - tic
    print(f"\n{lang} captions only ({res['train_captions']} captions of {res['train_photos']} photos) -> "
          f"{res['photos']} test photos, {res['queries']} queries")
    print(f"{'':8} {'R@1':>6} {'R@5':>6}\nteacher  {res['teacher_r1']:6.3f} {res['teacher_r5']:6.3f}\n"
          f"student  {res['student_r1']:6.3f} {res['student_r5']:6.3f}\n{wall / 60:.1f} min")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    write_result(f"multilingual_captions_{lang}{'_' + mode if mode != 'full' else ''}", device, args.out,
                 ("transformers",), mode=mode, captions=str(args.captions), eval=(args.eval or [None])[0],
                 photo_teacher=str(photo_dir), settings=cfg, wall_s=wall, captions_only={lang: res})


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
