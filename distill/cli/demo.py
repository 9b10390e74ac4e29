"""``distill demo``: the offline end-to-end run (generated data, a small teacher, a distilled student)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("demo", help="offline end-to-end demo (a few minutes on 2 CPU cores)",
                       description="Generates captioned shapes, trains a small teacher CLIP on them once (cached in "
                       "~/.cache/clip-distill), distils a 5x smaller student with the same Distiller a real run uses, and "
                       "prints teacher vs student zero-shot accuracy, retrieval R@1, parameters and images/s. "
                       "With --teacher and --data it distils a real teacher on your data instead.")
    d.add_argument("--teacher", help="real teacher instead of the generated one, e.g. openclip:ViT-B-32")
    d.add_argument("--pretrained", help="open_clip pretrained tag or weights file for --teacher")
    d.add_argument("--data", help="csv/jsonl of image,caption or a folder (with --teacher)")
    d.add_argument("--student", help="student name (default: a narrow vit_tiny for the demo, vit_tiny otherwise)")
    d.add_argument("--steps", type=count(1), help="distillation steps")
    d.add_argument("--work", help="where to write the run (default: ~/.cache/clip-distill/demo/runs)")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", help="also write the results as JSON to this file")
    d.set_defaults(run=cmd_demo)


def cmd_demo(args) -> int:
    from ..demo import DemoSizes, run_demo
    from ..report import format_table

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
