"""``distill plan``: the batch size, accumulation and checkpointing that fit a memory budget."""
from __future__ import annotations

import argparse

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    pl = sub.add_parser("plan", help="batch size / accumulation / checkpointing that fit a VRAM budget",
                        description="Builds the recipe's student and probes two micro-batches on this device "
                        "(a GPU: measured peak memory; a CPU: params x 16 B + saved activations + 10%%), with and "
                        "without gradient checkpointing, then prints the settings that reach the recipe's "
                        "effective batch (batch_size x grad_accum) inside --vram.")
    pl.add_argument("--recipe", default=None)
    pl.add_argument("--vram", required=True, help="e.g. 8GB")
    pl.add_argument("--effective-batch", type=count(1), default=None)
    pl.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    pl.add_argument("items", nargs="*", metavar="RECIPE_OR_OVERRIDE", help="a recipe file and/or key=value overrides")
    pl.set_defaults(run=cmd_plan)


def cmd_plan(args) -> int:
    from ..config import load_recipe
    from ..plan import make_plan

    files = [i for i in args.items if "=" not in i]
    path = args.recipe or (files[0] if files else None)
    if path is None:
        from ..errors import RecipeError

        raise RecipeError("--recipe: name a recipe: distill plan --recipe recipes/vit_tiny_from_vit_b32.yaml --vram 8GB")
    overrides = [i for i in args.items if "=" in i]
    plan = make_plan(load_recipe(path, overrides), args.vram, args.device, args.effective_batch)
    print(plan.table())
    print(plan.note)
    if plan.batch_size:
        print(f"suggested: distill fit {path} {plan.overrides()}")
    return 0 if plan.batch_size else 1
