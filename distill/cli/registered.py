"""``distill list``: the registered teachers, students and losses."""
from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("list", help="registered teachers, students and losses").set_defaults(run=cmd_list)


def cmd_list(args) -> int:
    from ..losses import LOSSES
    from ..students import list_students
    from ..teachers import list_teachers

    print("teachers:", ", ".join(list_teachers()), "| or openclip:<arch>, hf:<id|dir>, a saved folder")
    print("students:", ", ".join(list_students()), "| or timm:<name>, hf:<id|dir>, image+text")
    print("losses:  ", ", ".join(LOSSES.list()))
    return 0
