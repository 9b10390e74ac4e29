"""The ``distill`` command line: a thin layer over the Python API."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DESCRIPTION = """Distil a large frozen CLIP teacher into tiny, fast CLIP students.

commands:
  demo     offline end-to-end run: generated data, a small teacher, a distilled student, a report
  fit      distil a student from a recipe YAML (recipes/*.yaml), with key=value overrides
  tune     contrastively tune a two-tower model (a teacher) from a recipe
  export   deployable exports: safetensors, ONNX (FP32/FP16/INT8), open_clip, sentence-transformers, timm
  eval     student vs teacher: zero-shot, retrieval, fidelity, cost, and a report with plots
  cache    build / inspect / verify a teacher embedding cache (run the teacher once, train many times)
  tokenizer train a tokenizer for captions in any language (accents kept, CJK split)
  list     show the registered teachers, students and losses
"""


DEBUG_ENV = "DISTILL_DEBUG"  # set to 1: every error shows its Python traceback
REPORT_URL = "https://github.com/clip-distill/clip-distill/issues"


def _count(low: int, high: int | None = None):
    """argparse type: an integer in [``low``, ``high``], named in the error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} must be >= {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{value} must be <= {high}")
        return value

    return parse


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be in (0, 1]")
    return value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distill", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    from .version import __version__

    p.add_argument("--version", action="version", version=f"clip-distill {__version__}")
    p.add_argument("--debug", action="store_true",
                   help=f"show the Python traceback of any error (anywhere on the line; or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("demo", help="offline end-to-end demo (a few minutes on 2 CPU cores)",
                       description="Generates captioned shapes, trains a small teacher CLIP on them once (cached in "
                       "~/.cache/clip-distill), distils a 5x smaller student with the same Distiller a real run uses, and "
                       "prints teacher vs student zero-shot accuracy, retrieval R@1, parameters and images/s. "
                       "With --teacher and --data it distils a real teacher on your data instead.")
    d.add_argument("--teacher", help="real teacher instead of the generated one, e.g. openclip:ViT-B-32")
    d.add_argument("--pretrained", help="open_clip pretrained tag or weights file for --teacher")
    d.add_argument("--data", help="csv/jsonl of image,caption or a folder (with --teacher)")
    d.add_argument("--student", help="student name (default: a narrow vit_tiny for the demo, vit_tiny otherwise)")
    d.add_argument("--steps", type=_count(1), help="distillation steps")
    d.add_argument("--work", help="where to write the run (default: ~/.cache/clip-distill/demo/runs)")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", help="also write the results as JSON to this file")

    f = sub.add_parser("fit", help="distil a student from a recipe",
                       description="Distil from a recipe YAML. Overrides use dotted keys: "
                       "distill fit recipes/vit_tiny_from_vit_b32.yaml train.lr=1e-4 data.train=my.csv")
    f.add_argument("recipe", help="recipe YAML (only the fields that differ from the defaults)")
    f.add_argument("overrides", nargs="*", help="section.key=value (values parsed as YAML)")
    f.add_argument("--allow-stale", action="store_true", help="use a cache built with another teacher/preprocessing")

    t = sub.add_parser("tune", help="contrastively tune a two-tower model from a recipe",
                       description="CLIP loss with a learnable temperature; tune.lock=text (LiT)|image|both (heads "
                       "only, on trunk features computed once)|lora|none; tune.unfreeze_last=N also trains the last N "
                       "blocks of the locked trunks. The student section names the two-tower model (e.g. "
                       "resnet18+hf:minilm, efficientnet_lite2+hf:minilm with image_kwargs {pretrained: true}, "
                       "openclip:ViT-B-32+bert_small) and tune.embed_dim its shared space; the result in "
                       "<output_dir>/model loads with load_teacher().")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*")

    e = sub.add_parser("export", help="deployable student export (safetensors, ONNX FP32/FP16/INT8, open_clip, "
                       "sentence-transformers, timm)",
                       description="Reads a student folder or a run folder (its student/) and writes weights only to "
                       "--out. safetensors: model.safetensors + config.json (+ tokenizer), loadable by load_student(). "
                       "onnx*: image.onnx / text.onnx (dynamic batch) + onnx_config.json + tokenizer, loadable by "
                       "distill.runtime.OnnxStudent without torch. open_clip: a local-dir: folder "
                       "(open_clip.create_model_and_transforms('local-dir:OUT'); needs both towers: pair an image "
                       "student with --pair-teacher). sentence-transformers: the text tower (SentenceTransformer(OUT)). "
                       "timm: the image tower, its classifier the projection (timm.create_model('local-dir:OUT', "
                       "pretrained=True), transformers AutoModelForImageClassification). Each export but safetensors "
                       "is loaded back by its own runtime and compared with the PyTorch student on --data (or "
                       "generated inputs); it fails (exit 3) under the gate on the mean and the 1st-percentile cosine "
                       "(0.999/0.995 FP32, 0.99/0.98 FP16, 0.97/0.90 INT8, 0.9999/0.9995 open_clip, "
                       "sentence-transformers, timm); parity.md/json land in --out.")
    e.add_argument("path", help="student folder or run folder")
    e.add_argument("--out", required=True)
    e.add_argument("--format", default="safetensors", choices=["safetensors", "onnx", "onnx-fp16", "onnx-int8",
                                                                "open_clip", "sentence-transformers", "timm"])
    e.add_argument("--towers", default=None, help="image,text (default: every tower the student has; safetensors/onnx)")
    e.add_argument("--data", default=None, help="parity/calibration data (csv, jsonl, folder...)")
    e.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"], help="safetensors weight dtype")
    e.add_argument("--quantization", default="dynamic", choices=["dynamic", "static"],
                   help="INT8: dynamic, or static calibrated on --data images other than the ones verified (image tower)")
    e.add_argument("--threshold", type=float, default=None, help="minimum mean cosine (default per format)")
    e.add_argument("--low-threshold", type=float, default=None,
                   help="minimum 1st-percentile cosine (default per format)")
    e.add_argument("--no-gate", action="store_true", help="write the parity table but never fail")
    e.add_argument("--pair-teacher", default=None,
                   help="add this teacher's text tower to an image student (saved/LiT, text: or openclip: teachers)")
    e.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file for --pair-teacher")
    e.add_argument("--overwrite", action="store_true",
                   help="replace another clip-distill artifact at --out (never the student's own folder)")

    d = sub.add_parser("data", help="check or pack a data source")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="open every image; report and set aside rows that would fail",
                         description="Decodes every image fully, in parallel. Rejects missing, empty, corrupt/"
                         "truncated, too small or too large images and rows with an empty caption; notes CMYK/"
                         "palette/alpha modes, duplicate images (content hash) and over-long captions. Writes "
                         "clean.jsonl, rejected.jsonl and report.json into --out. Exit 1 only when no row is usable.")
    dc.add_argument("source", help="csv/tsv/json/jsonl/txt, a folder, .tar shards or hf:<dataset>")
    dc.add_argument("--out", default=None)
    dc.add_argument("--workers", type=_count(1), default=None)
    dc.add_argument("--min-side", type=_count(1), default=16)
    dc.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")
    dp = dsub.add_parser("pack", help="decode images once into a memory-mapped uint8 store",
                         description="Squashes every image to SIZE x SIZE uint8 shards (+ index.json with the original "
                         "sizes); set data.packed=DIR in a recipe (or --packed for cache build) to train on bytes "
                         "instead of JPEGs. Crops replay exactly: views are fractions of the image.")
    dp.add_argument("source")
    dp.add_argument("--out", required=True)
    dp.add_argument("--size", type=_count(8, 4096), default=224)
    dp.add_argument("--workers", type=_count(1), default=None)
    dp.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")

    pl = sub.add_parser("plan", help="batch size / accumulation / checkpointing that fit a VRAM budget",
                        description="Builds the recipe's student and probes two micro-batches on this device "
                        "(a GPU: measured peak memory; a CPU: params x 16 B + saved activations + 10%%), with and "
                        "without gradient checkpointing, then prints the settings that reach the recipe's "
                        "effective batch (batch_size x grad_accum) inside --vram.")
    pl.add_argument("--recipe", default=None)
    pl.add_argument("--vram", required=True, help="e.g. 8GB")
    pl.add_argument("--effective-batch", type=_count(1), default=None)
    pl.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    pl.add_argument("items", nargs="*", metavar="RECIPE_OR_OVERRIDE", help="a recipe file and/or key=value overrides")

    v = sub.add_parser("eval", help="evaluate a student against its teacher and write a report",
                       description="Zero-shot top-1/top-5 on a class-folder set (or a CSV with a label column), "
                       "retrieval R@1/5/10 both ways on a caption set, fidelity (mean cosine, top-10 neighbour "
                       "overlap) and cost (params, MACs, latency, throughput), for teacher and student in one run. "
                       "Writes report.md, results.json and PNG plots into --out (default: STUDENT/eval).")
    v.add_argument("--student", required=True, help="student folder (or a run folder with student/)")
    v.add_argument("--teacher", help="default: the teacher recorded in the student's config.json")
    v.add_argument("--pretrained")
    v.add_argument("--data", help="image,caption pairs for retrieval and fidelity")
    v.add_argument("--classes", help="class-folder set or CSV with labels for zero-shot")
    v.add_argument("--queries", action="append", default=[], metavar="[NAME=]FILE",
                   help="captions in another language of the --data photos (image,caption): cross-lingual caption "
                        "retrieval against --data's captions, and text->image with an image tower; repeatable")
    v.add_argument("--templates", default="imagenet", help="imagenet (80 CLIP prompts), simple, or a file")
    v.add_argument("--limit", type=_count(1), help="evaluate at most this many rows of each set")
    v.add_argument("--out", help="report folder")
    v.add_argument("--device", default="cuda" if _cuda() else "cpu")

    c = sub.add_parser("cache", help="teacher embedding cache: build, info, verify",
                       description="Runs the frozen teacher once over the data and keeps image (K views each) and "
                       "text embeddings in memory-mapped shards. A killed build resumes where it stopped; a build "
                       "over grown data encodes only the new rows. Train from it with `distill fit ... cache.dir=DIR`.")
    csub = c.add_subparsers(dest="cache_command", metavar="ACTION")
    cb = csub.add_parser("build", help="encode what the cache lacks")
    cb.add_argument("--teacher", required=True, help="preset, openclip:<arch>, hf:<id|dir> or a saved folder")
    cb.add_argument("--pretrained", help="open_clip pretrained tag or weights file")
    cb.add_argument("--data", required=True, help="csv/tsv/json/jsonl of image,caption or a folder")
    cb.add_argument("--packed", default=None, help="a store from `distill data pack`: no JPEG decoding")
    cb.add_argument("--out", required=True, help="cache folder")
    cb.add_argument("--views", type=_count(1), default=1,
                    help="views per image (>= 1): view 0 is the eval transform, the rest random crops")
    cb.add_argument("--crop-scale", type=_fraction, nargs=2, default=(0.5, 1.0), metavar=("LOW", "HIGH"),
                    help="area range of the random crops (the recipe's data.crop_scale must match)")
    cb.add_argument("--flip", action="store_true", help="random horizontal flips in the views (data.flip)")
    cb.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    cb.add_argument("--batch-size", type=_count(1), default=256)
    cb.add_argument("--workers", type=_count(0), default=4)
    cb.add_argument("--shard-size", type=_count(1), default=4096)
    cb.add_argument("--seed", type=int, default=0, help="seed of the random views")
    ci = csub.add_parser("info", help="print the manifest summary")
    ci.add_argument("dir")
    cv = csub.add_parser("verify", help="check shards against the manifest (and re-encode samples with --teacher)")
    cv.add_argument("dir")
    cv.add_argument("--teacher", help="re-encode a sample with this teacher and compare")
    cv.add_argument("--pretrained")
    cv.add_argument("--data", help="the data the cache was built from (with --teacher)")
    cv.add_argument("--sample", type=_count(0), default=32)
    cv.add_argument("--allow-stale", action="store_true", help="skip the teacher identity check")

    tk = sub.add_parser("tokenizer", help="train a tokenizer for captions in any language",
                        description="Learns a WordPiece (default, BERT-compatible), BPE or Unigram vocabulary from the "
                        "captions of the data sources (Unicode NFC or NFKC, accents kept, CJK characters one token "
                        "each) and writes a transformers tokenizer folder. Use it with student.kwargs.tokenizer=DIR "
                        "(a student from scratch) or student.kwargs.extend_vocab=DIR (grow a pretrained vocabulary).")
    tsub = tk.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="learn a vocabulary from captions")
    tt.add_argument("sources", nargs="+", help="caption data (csv, jsonl, txt, folder...) or parallel csv files")
    tt.add_argument("--out", required=True)
    from .vocab import MAX_VOCAB  # light: no tokenizers import until a vocabulary is trained

    tt.add_argument("--vocab", type=_count(16, MAX_VOCAB), default=16000, help="vocabulary size")
    tt.add_argument("--model", default="wordpiece", choices=["wordpiece", "bpe", "unigram"])
    tt.add_argument("--normalize", default="nfc", choices=["nfc", "nfkc"])
    tt.add_argument("--lowercase", action="store_true")
    tt.add_argument("--columns", default=None, help="columns of a parallel csv to read (e.g. en,de,fr)")
    tt.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")

    sub.add_parser("list", help="registered teachers, students and losses")
    return p


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def cmd_eval(args) -> int:
    from .data import load_rows
    from .errors import DataError, RecipeError
    from .eval import evaluate_pair
    from .report import format_table, write_report
    from .interop import load_student
    from .teachers import load_teacher, teacher_from_identity
    from .templates import load_templates

    src = Path(args.student)
    if not (src / "config.json").exists() and (src / "student" / "config.json").exists():
        src = src / "student"
    student = load_student(src, device=args.device)
    name, pretrained = (args.teacher, args.pretrained) if args.teacher else teacher_from_identity(student.teacher_identity)
    teacher = load_teacher(name, pretrained=pretrained or args.pretrained, device=args.device)
    if not args.data and not args.classes:
        raise RecipeError("--data / --classes: give --data (caption pairs) and/or --classes (labelled images)")
    captions = load_rows(args.data) if args.data else None
    queries = {}
    for spec in args.queries:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        queries[name or Path(path).stem] = load_rows(path)
    classes = load_rows(args.classes) if args.classes else None
    if classes is not None and not classes.labels:
        raise DataError(f"{args.classes}: no labels: use class subfolders with images in them, or a file with a "
                        f"label column ({classes.layout or 'read'}: {len(classes)} rows)")
    if args.limit:  # a seeded sample, so class folders keep every class
        import numpy as np

        pick = lambda rows: rows.subset(sorted(np.random.default_rng(0).permutation(len(rows))[:args.limit]))  # noqa: E731
        captions = pick(captions) if captions else None
        classes = pick(classes) if classes else None
    results = evaluate_pair(teacher, student, captions, classes, load_templates(args.templates), device=args.device,
                            queries=queries)
    print(format_table(results))
    report = write_report(results, args.out or src / "eval", run_dir=src.parent)
    print(f"report: {report}")
    return 0


def cmd_plan(args) -> int:
    from .config import load_recipe
    from .plan import make_plan

    files = [i for i in args.items if "=" not in i]
    path = args.recipe or (files[0] if files else None)
    if path is None:
        from .errors import RecipeError

        raise RecipeError("--recipe: name a recipe: distill plan --recipe recipes/vit_tiny_from_vit_b32.yaml --vram 8GB")
    overrides = [i for i in args.items if "=" in i]
    plan = make_plan(load_recipe(path, overrides), args.vram, args.device, args.effective_batch)
    print(plan.table())
    print(plan.note)
    if plan.batch_size:
        print(f"suggested: distill fit {path} {plan.overrides()}")
    return 0 if plan.batch_size else 1


def cmd_data(args) -> int:
    if args.data_command == "check":
        from .check import check_data

        report = check_data(args.source, args.out, workers=args.workers, min_side=args.min_side,
                            overwrite=args.overwrite)
        print(report.summary())
        for r in report.rejected[:20]:
            print(f"  rejected row {r['row']}: {r['image'] or r['caption']!r}: {r['reason']}")
        if len(report.rejected) > 20:
            print(f"  ... {len(report.rejected) - 20} more in {Path(args.out or '.') / 'rejected.jsonl'}")
        if args.out:
            print(f"wrote {Path(args.out) / 'clean.jsonl'}, rejected.jsonl and report.json")
        return 0 if report.clean else 1
    from .pack import pack_images

    summary = pack_images(args.source, args.out, size=args.size, workers=args.workers, overwrite=args.overwrite)
    print(f"packed {summary.images} images at {args.size} px into {summary.path} ({summary.bytes / 1e6:.1f} MB); "
          f"{len(summary.skipped)} unreadable skipped")
    return 0


def cmd_tokenizer(args) -> int:
    from .vocab import texts_of, train_tokenizer

    from .outputs import claim, inputs_of, staged

    claim(args.out, "a tokenizer", inputs_of({"a caption source": args.sources}), overwrite=args.overwrite)
    columns = [c.strip() for c in args.columns.split(",")] if args.columns else []
    texts = texts_of(args.sources, columns)
    tok = train_tokenizer(texts, args.vocab, args.model, args.normalize, args.lowercase)
    with staged(args.out) as tmp:
        tok.save_pretrained(str(tmp))
    unk = sum(e.count(tok.unk_token_id) for e in tok(texts[:2000], add_special_tokens=False)["input_ids"])
    print(f"trained a {args.model} tokenizer of {len(tok)} tokens on {len(texts)} captions; wrote {args.out} "
          f"({unk} [UNK] in the first {min(2000, len(texts))} captions)")
    return 0


def cmd_cache(args) -> int:
    from .cache import EmbeddingCache, TeacherService

    if args.cache_command == "build":
        from .teachers import load_teacher

        teacher = load_teacher(args.teacher, pretrained=args.pretrained)
        reader = None
        if args.packed:
            from .pack import PackedImages

            reader = PackedImages(args.packed)
        if args.crop_scale[0] > args.crop_scale[1]:
            from .errors import RecipeError

            raise RecipeError(f"--crop-scale: {args.crop_scale[0]} {args.crop_scale[1]}: LOW must not be above HIGH")
        service = TeacherService(teacher, args.out, dtype=args.dtype, shard_size=args.shard_size,
                                 batch_size=args.batch_size, num_workers=args.workers, reader=reader)
        print(service.build(args.data, views=args.views, seed=args.seed, scale=tuple(args.crop_scale),
                            flip=args.flip).line())
        return 0
    if args.cache_command is None:
        print("usage: distill cache {build,info,verify} ...", file=sys.stderr)
        return 2
    cache = EmbeddingCache.open(args.dir, check_values=args.cache_command != "verify")
    if args.cache_command == "info":
        print(cache.info())
        return 0
    if args.cache_command == "verify":
        teacher = rows = None
        if args.teacher:
            from .data import load_rows
            from .teachers import load_teacher

            if not args.data:
                from .errors import RecipeError

                raise RecipeError("--data: --teacher needs --data to re-encode samples")
            teacher, rows = load_teacher(args.teacher, pretrained=args.pretrained), load_rows(args.data)
            cache.check(teacher, allow_stale=args.allow_stale)
        problems = cache.verify(teacher, args.sample, rows)
        for p in problems:
            print(f"problem: {p}")
        print(f"{args.dir}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        return 1 if problems else 0
    print("usage: distill cache {build,info,verify} ...", file=sys.stderr)
    return 2


def cmd_demo(args) -> int:
    from .demo import DemoSizes, run_demo
    from .report import format_table

    sizes = DemoSizes.quick() if args.quick else DemoSizes()
    results = run_demo(args.work, args.teacher, args.pretrained, args.data, args.student, sizes,
                       seed=args.seed, max_steps=args.steps)
    print()
    print(format_table(results))
    print(f"\nstudent saved to {results['student_dir']}  ({results['seconds']:.0f} s in all)")
    print(f"report: {results['report']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def cmd_fit(args) -> int:
    from .config import load_recipe
    from .trainer import Distiller

    recipe = load_recipe(args.recipe, args.overrides + (["cache.allow_stale=true"] if args.allow_stale else []))
    result = Distiller(recipe=recipe).fit()
    print(f"final loss {result.history['loss'][-1]:.4f} after {result.steps} steps; student: {result.model_dir}")
    return 0


def cmd_tune(args) -> int:
    from .config import load_recipe
    from .tune import Tuner

    recipe = load_recipe(args.recipe, args.overrides)
    result = Tuner(recipe=recipe).fit()
    print(f"final loss {result.history['loss'][-1]:.4f}; model: {result.model_dir} (load_teacher() loads it)")
    return 0


def cmd_export(args) -> int:
    from .export import ExportGateError, export
    from .interop.pair import pair_with_teacher_text
    from .interop import load_student

    src = Path(args.path)
    if not (src / "config.json").exists() and (src / "student" / "config.json").exists():
        src = src / "student"
    student = load_student(src)
    if args.pair_teacher:
        from .teachers import load_teacher

        student = pair_with_teacher_text(student, load_teacher(args.pair_teacher, pretrained=args.pretrained))
    towers = args.towers.split(",") if args.towers else None
    try:
        result = export(student, args.out, args.format, towers, data=args.data, dtype=args.dtype,
                        quantization=args.quantization, threshold=args.threshold, gate=not args.no_gate,
                        low_threshold=args.low_threshold, overwrite=args.overwrite,
                        inputs={"the student being exported": src, "the paired teacher": args.pair_teacher,
                                "the paired teacher's weights": args.pretrained})
    except ExportGateError as e:
        print(f"distill export: gate failed: {e}", file=sys.stderr)
        return 3
    size = sum(result.files.values())
    print(f"exported {student.modality} student ({student.num_params() / 1e6:.2f}M params) as {args.format} "
          f"to {result.path} ({size / 1e6:.1f} MB)")
    for name, r in result.parity.items():
        if isinstance(r, dict) and "p1_cosine" in r:
            print(f"  {name}: mean cosine to PyTorch {r['mean_cosine']:.5f} (1st percentile {r['p1_cosine']:.5f}, "
                  f"min {r['min_cosine']:.5f}, max abs err {r['max_abs_err']:.1e}, n={r['n']})")
    return 0


def cmd_list(args) -> int:
    from .losses import LOSSES
    from .students import list_students
    from .teachers import list_teachers

    print("teachers:", ", ".join(list_teachers()), "| or openclip:<arch>, hf:<id|dir>, a saved folder")
    print("students:", ", ".join(list_students()), "| or timm:<name>, hf:<id|dir>, image+text")
    print("losses:  ", ", ".join(LOSSES.list()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``distill`` command. Errors the user can fix (``distill.errors``, missing files, a bad
    recipe) print as one line, ``distill <command>: error: <what> (<file>[:line] | <key>)``, and exit 2;
    ``--debug`` or ``DISTILL_DEBUG=1`` shows their traceback. Anything else is a bug: its traceback is
    shown with a line saying how to report it (exit 1)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    parser = _parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not args.command:
        parser.print_help()
        return 0
    commands = {"demo": cmd_demo, "fit": cmd_fit, "tune": cmd_tune, "export": cmd_export, "cache": cmd_cache,
                "data": cmd_data, "plan": cmd_plan, "eval": cmd_eval, "list": cmd_list, "tokenizer": cmd_tokenizer}
    try:
        return commands[args.command](args)
    except KeyboardInterrupt:
        print(f"\ndistill {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001: the one place errors become messages
        message = user_error(e)
        if message is None or debug:
            import traceback

            traceback.print_exc()
        if message is None:
            print(f"distill {args.command}: internal error ({type(e).__name__}). This is a bug in clip-distill: "
                  f"please report it at {REPORT_URL} with the command and the traceback above.", file=sys.stderr)
            return 1
        # one write, so lines from several processes sharing a terminal do not interleave
        sys.stderr.write(f"distill {args.command}: error: {message}\n")
        sys.stderr.flush()
        return 2
    finally:
        if "torch" in sys.modules:  # several processes: close the group so no process aborts on exit
            from .dist import shutdown

            shutdown()


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug."""
    from .errors import DistillError

    if isinstance(e, DistillError):
        return str(e)
    if isinstance(e, OSError) and getattr(e, "filename", None):  # missing file, permission, disk full
        return f"{e.strerror or e} ({e.filename})"
    if isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return str(e)
    if type(e).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
        return ("out of memory on the GPU: lower train.batch_size (with train.grad_accum to keep the effective "
                "batch), or see `distill plan --vram`")
    return None


if __name__ == "__main__":
    sys.exit(main())
