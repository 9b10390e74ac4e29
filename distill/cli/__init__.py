"""The ``distill`` command line: a thin layer over the Python API, one module per command (each adds its
parser and runs it). Building the parser imports no torch: ``distill --help`` is instant."""
from __future__ import annotations

import argparse
import os
import sys

from .._compat import forward

DESCRIPTION = """Distil a large frozen CLIP teacher into tiny, fast CLIP students.

commands:
  demo     offline end-to-end run: generated data, a small teacher, a distilled student, a report
  fit      distil a student from a recipe YAML (recipes/*.yaml), with key=value overrides
  tune     contrastively tune a two-tower model (a teacher) from a recipe
  export   deployable exports: safetensors, ONNX (FP32/FP16/INT8), open_clip, sentence-transformers, timm
  eval     student vs teacher: zero-shot, retrieval, fidelity, cost, and a report with plots
  cache    build / inspect / verify a teacher embedding cache (run the teacher once, train many times)
  tokenizer train a tokenizer for captions in any language (accents kept, CJK split)
  index    embed a folder of photos into a search index (incremental; an ONNX export needs no torch)
  search   search an index by text or by an example photo
  serve    a local web page to search an index
  adapt    train an adapter: a frozen tower (teacher or student) as a frozen language model's eyes
  caption  caption photos, or answer a prompt about them, with a saved adapter
  list     show the registered teachers, students and losses
"""


DEBUG_ENV = "DISTILL_DEBUG"  # set to 1: every error shows its Python traceback
REPORT_URL = "https://github.com/clip-distill/clip-distill/issues"


COMMANDS = ("demo", "train", "export", "data", "plan", "evaluate", "cache", "tokenizer", "search", "vlm",
            "registered")  # in help order


def build_parser() -> argparse.ArgumentParser:
    """The whole ``distill`` parser: the global flags, then each command module's parsers."""
    import importlib

    from ..version import __version__

    p = argparse.ArgumentParser(prog="distill", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"clip-distill {__version__}")
    p.add_argument("--debug", action="store_true",
                   help=f"show the Python traceback of any error (anywhere on the line; or set {DEBUG_ENV}=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``distill`` command. Errors the user can fix (``distill.errors``, missing files, a bad
    recipe) print as one line, ``distill <command>: error: <what> (<file>[:line] | <key>)``, and exit 2;
    ``--debug`` or ``DISTILL_DEBUG=1`` shows their traceback. Anything else is a bug: its traceback is
    shown with a line saying how to report it (exit 1)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    parser = build_parser()
    args = parser.parse_args([a for a in argv if a != "--debug"])
    if not args.command:
        parser.print_help()
        return 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's agent ends the other processes when one fails
        import signal

        signal.signal(signal.SIGTERM, _ended_by_launcher)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print(f"\ndistill {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the one place errors become messages
        message = user_error(e)
        if message is None or debug:
            import traceback

            traceback.print_exc()
        if message is None:
            print(f"distill {args.command}: internal error ({type(e).__name__}). This is a bug in clip-distill: "
                  f"please report it at {REPORT_URL} with the command and the traceback above.", file=sys.stderr)
            return 1
        message += _process_tag(e)
        # one write, so lines from several processes sharing a terminal do not interleave
        sys.stderr.write(f"distill {args.command}: error: {message}\n")
        sys.stderr.flush()
        return 2
    finally:
        if "torch" in sys.modules:  # several processes: close the group so no process aborts on exit
            from ..dist import shutdown

            shutdown()


def _ended_by_launcher(signum: int, frame: object) -> None:
    from ..errors import ProcessStoppedError

    raise ProcessStoppedError(f"stopped by the launcher (torchrun): another process ended, it failed or was killed "
                              f"(process {os.environ.get('RANK', '?')} of {os.environ.get('WORLD_SIZE', '?')})")


def _process_tag(e: BaseException) -> str:
    """`` (process 1 of 2)`` for this process's own error under several processes (a ProcessStoppedError
    names the process that failed itself)."""
    if "torch" not in sys.modules:
        return ""
    from ..dist import where
    from ..errors import ProcessStoppedError

    tag = where()
    return "" if isinstance(e, ProcessStoppedError) or tag.strip() in str(e) else tag


def user_error(e: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for a bug (``errors.user_message``)."""
    from ..errors import user_message

    return user_message(e)


__getattr__ = forward(__name__, {"teacher_from_identity": "distill.teachers:teacher_from_identity"})  # moved
