"""``distill index``, ``distill search`` and ``distill serve``: photo search with a student."""
from __future__ import annotations

import argparse
import sys

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("index", help="embed the photos of a folder (or any data source) into a search index",
                       description="Embeds every photo of SOURCE (a folder, searched recursively, or any data source "
                       "`fit` reads) with --model into the index folder --out. Run it again after photos change: "
                       "only new or changed photos are embedded (content keys), and photos gone from SOURCE leave "
                       "the index. Unreadable, too small or too large photos are skipped and listed. An ONNX export "
                       "(distill export --format onnx-int8) needs no torch.")
    i.add_argument("source", help="a folder of photos, a csv/jsonl with an image column, .tar shards, hf:<dataset>")
    i.add_argument("--model", required=True, help="an ONNX export, a saved student, a run or another export folder")
    i.add_argument("--out", required=True, help="the index folder (created, or updated when it is one)")
    i.add_argument("--batch-size", type=count(1, 4096), default=32)
    i.add_argument("--workers", type=count(1, 64), default=4, help="threads decoding photos")
    i.set_defaults(run=run_index)

    s = sub.add_parser("search", help="search an index by text or by an example photo",
                       description="Prints the top K photos with their cosine scores, best first (--json: one JSON "
                       "object). The model is the one that built the index unless --model names another export of "
                       "the same student (an INT8 one, say).")
    s.add_argument("index", help="an index folder (distill index)")
    s.add_argument("query", nargs="?", help="what to look for, in words")
    s.add_argument("--image", help="an example photo (instead of words)")
    s.add_argument("--model", help="the model to embed the query with (default: the one that built the index)")
    s.add_argument("-k", "--top", type=count(1, 10_000), default=10)
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(run=run_search)

    v = sub.add_parser("serve", help="a local web page to search an index (search box, thumbnails, scores)",
                       description="Serves http://HOST:PORT/ until interrupted: type a query, see the best photos "
                       "with their scores; click one for photos like it. Listens on 127.0.0.1 unless --host says "
                       "otherwise.")
    v.add_argument("index")
    v.add_argument("--model", help="default: the one that built the index")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=count(0, 65535), default=8000)
    v.set_defaults(run=run_serve)


def run_index(args: argparse.Namespace) -> int:
    from ..search import index_photos

    summary = index_photos(args.source, args.out, args.model, batch_size=args.batch_size, workers=args.workers)
    for path, why in summary.skipped[:20]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    if len(summary.skipped) > 20:
        print(f"... and {len(summary.skipped) - 20} more skipped photos", file=sys.stderr)
    print(f"{args.out}: {summary.photos:,} photos ({summary.embedded:,} embedded now, {summary.removed:,} removed, "
          f"{len(summary.skipped):,} skipped) in {summary.seconds:.1f} s")
    return 0


def run_search(args: argparse.Namespace) -> int:
    import json

    from ..errors import RecipeError
    from ..search import Searcher

    if (args.query is None) == (args.image is None):
        raise RecipeError("search: give a query in words or --image PHOTO (one of the two)")
    searcher = Searcher(args.index, args.model)
    result = searcher.text(args.query, args.top) if args.query is not None else searcher.image(args.image, args.top)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    if args.json:
        print(json.dumps({"query": args.query, "image": args.image, "notes": result.notes,
                          "hits": [{"path": h.path, "score": round(h.score, 6), "key": h.key} for h in result.hits]}))
    elif not result.hits:
        print(f"{args.index}: the index holds no photos")
    else:
        for rank, h in enumerate(result.hits, 1):
            print(f"{rank:>3}  {h.score:.4f}  {h.path}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from ..search import Searcher
    from ..search.serve import serve

    searcher = Searcher(args.index, args.model)
    serve(searcher, args.host, args.port)
    return 0
