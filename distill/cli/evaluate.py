"""``distill eval``: a student against its teacher, with a report."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    v.add_argument("--limit", type=count(1), help="evaluate at most this many rows of each set")
    v.add_argument("--out", help="report folder")
    v.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    v.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..data import load_rows
    from ..errors import DataError, RecipeError
    from ..eval import evaluate_pair
    from ..report import format_table, write_report
    from ..interop import load_student
    from ..outputs import model_folder
    from ..teachers import load_teacher, teacher_from_identity
    from ..templates import load_templates

    src = Path(args.student)
    src = model_folder(src)
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
    if not args.out:  # the report in its default place: the student's model card shows it
        from ..card import update_card

        update_card(src, results)
    return 0
