"""``distill data check`` and ``distill data pack``."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("data", help="check or pack a data source")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dc = dsub.add_parser("check", help="open every image; report and set aside rows that would fail",
                         description="Decodes every image fully, in parallel. Rejects missing, empty, corrupt/"
                         "truncated, too small or too large images and rows with an empty caption; notes CMYK/"
                         "palette/alpha modes, duplicate images (content hash) and over-long captions. Writes "
                         "clean.jsonl, rejected.jsonl and report.json into --out. Exit 1 only when no row is usable.")
    dc.add_argument("source", help="csv/tsv/json/jsonl/txt, a folder, .tar shards or hf:<dataset>")
    dc.add_argument("--out", default=None)
    dc.add_argument("--workers", type=count(1), default=None)
    dc.add_argument("--min-side", type=count(1), default=16)
    dc.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")
    dp = dsub.add_parser("pack", help="decode images once into a memory-mapped uint8 store",
                         description="Squashes every image to SIZE x SIZE uint8 shards (+ index.json with the original "
                         "sizes); set data.packed=DIR in a recipe (or --packed for cache build) to train on bytes "
                         "instead of JPEGs. Crops replay exactly: views are fractions of the image.")
    dp.add_argument("source")
    dp.add_argument("--out", required=True)
    dp.add_argument("--size", type=count(8, 4096), default=224)
    dp.add_argument("--workers", type=count(1), default=None)
    dp.add_argument("--overwrite", action="store_true", help="replace another clip-distill artifact at --out")
    pp = dsub.add_parser("pair", help="captions of the same photos in two or more languages -> parallel sentences",
                         description="Each LANG=FILE is an image,caption source; the first is the language the "
                         "teacher reads. Every caption of a photo in another language is paired with every caption "
                         "of that photo in the first (photos matched by path), written as a parallel csv for "
                         "data.parallel_source: captions written in the language itself, not translated.")
    pp.add_argument("sources", nargs="+", metavar="LANG=FILE", type=_lang_file)
    pp.add_argument("--out", required=True, help="the parallel csv to write")
    d.set_defaults(run=cmd_data)


def cmd_data(args) -> int:
    if args.data_command == "check":
        from ..check import check_data

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
    if args.data_command == "pair":
        return _pair(args)
    from ..data.packed import pack_images

    summary = pack_images(args.source, args.out, size=args.size, workers=args.workers, overwrite=args.overwrite)
    print(f"packed {summary.images} images at {args.size} px into {summary.path} ({summary.bytes / 1e6:.1f} MB); "
          f"{len(summary.skipped)} unreadable skipped")
    return 0


def _lang_file(text: str) -> tuple[str, str]:
    lang, sep, path = text.partition("=")
    if not sep or not lang or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give LANG=FILE (e.g. en=captions.csv zh=captions-zh.csv)")
    return lang, path


def _pair(args) -> int:
    from ..data import load_rows, pair_by_image, write_parallel
    from ..errors import RecipeError

    langs = [lang for lang, _ in args.sources]
    if len(langs) < 2 or len(set(langs)) != len(langs):
        raise RecipeError(f"distill data pair: {' '.join(langs)}: give two or more LANG=FILE, one per language")
    (src_lang, src), others = args.sources[0], args.sources[1:]
    table = pair_by_image(load_rows(src), {lang: load_rows(path) for lang, path in others}, src_lang)
    write_parallel(table, args.out)
    counts = {lang: sum(1 for row in table if row[lang]) for lang, _ in others}
    print(f"wrote {len(table)} pairs to {args.out} ({', '.join(f'{k}: {v}' for k, v in counts.items())}); "
          f"train with data.parallel_source: {src_lang}")
    return 0
