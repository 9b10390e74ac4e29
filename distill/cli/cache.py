"""``distill cache build | info | verify``: the teacher embedding cache."""
from __future__ import annotations

import argparse
import sys

from .args import count, fraction


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    cb.add_argument("--views", type=count(1), default=1,
                    help="views per image (>= 1): view 0 is the eval transform, the rest random crops")
    cb.add_argument("--crop-scale", type=fraction, nargs=2, default=(0.5, 1.0), metavar=("LOW", "HIGH"),
                    help="area range of the random crops (the recipe's data.crop_scale must match)")
    cb.add_argument("--flip", action="store_true", help="random horizontal flips in the views (data.flip)")
    cb.add_argument("--dtype", default="fp16", choices=["fp16", "fp32"])
    cb.add_argument("--batch-size", type=count(1), default=256)
    cb.add_argument("--workers", type=count(0), default=4)
    cb.add_argument("--shard-size", type=count(1), default=4096)
    cb.add_argument("--seed", type=int, default=0, help="seed of the random views")
    ci = csub.add_parser("info", help="print the manifest summary")
    ci.add_argument("dir")
    cv = csub.add_parser("verify", help="check shards against the manifest (and re-encode samples with --teacher)")
    cv.add_argument("dir")
    cv.add_argument("--teacher", help="re-encode a sample with this teacher and compare")
    cv.add_argument("--pretrained")
    cv.add_argument("--data", help="the data the cache was built from (with --teacher)")
    cv.add_argument("--sample", type=count(0), default=32)
    cv.add_argument("--allow-stale", action="store_true", help="skip the teacher identity check")
    c.set_defaults(run=cmd_cache)


def cmd_cache(args) -> int:
    from ..cache import EmbeddingCache, TeacherService

    if args.cache_command == "build":
        from ..teachers import load_teacher

        teacher = load_teacher(args.teacher, pretrained=args.pretrained)
        reader = None
        if args.packed:
            from ..data.packed import PackedImages

            reader = PackedImages(args.packed)
        if args.crop_scale[0] > args.crop_scale[1]:
            from ..errors import RecipeError

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
            from ..data import load_rows
            from ..teachers import load_teacher

            if not args.data:
                from ..errors import RecipeError

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
