"""Data loader samples/s at 224 px: raw JPEG decoding vs the packed uint8 store (``distill data pack``).

    python benchmarks/loader_throughput.py                 # 2 workers (this machine)
    python benchmarks/loader_throughput.py --workers 16    # a GPU box

Uses the 1,000 real flickr1k photos (../shared/assets; ~500x375 JPEGs) when present, else generated
JPEGs. Both loaders produce the same random-resized crops (224 px, normalised, as the student sees
them) through ``PairDataset``; the store is packed at 256 px so a crop downsamples. Packing time is
reported too. Writes benchmarks/results/loader_throughput_<device>.json.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _results import write_result  # noqa: E402

from distill.data import PairDataset, Rows, load_rows, make_collate  # noqa: E402
from distill.data.packed import PackedImages, pack_images  # noqa: E402
from distill.transforms import PreprocessCfg  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def rows_for(assets: Path, n: int, tmp: Path) -> tuple[Rows, str]:
    caps = assets / "flickr1k" / "captions.csv"
    if caps.exists():
        rows = load_rows(caps)
        keep = sorted({p: i for i, p in enumerate(rows.images)}.values())[:n]  # one row per photo
        return rows.subset(keep), "flickr1k photos"
    from cache_throughput import make_images

    return load_rows(make_images(tmp / "gen", n, size=480)), "generated 480x480 JPEGs"


def samples_per_s(dataset, workers: int, batch: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=make_collate({}), persistent_workers=False,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)  # workers started, first batch out
    tic, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["captions"])
        except StopIteration:
            it = iter(loader)
    return n / (time.perf_counter() - tic)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--assets", default=str(ROOT.parent / "shared" / "assets"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="loader_tp_"))
    rows, what = rows_for(Path(args.assets), args.images, tmp)
    tic = time.perf_counter()
    pack_images(rows, tmp / "pack", size=256, workers=args.workers, progress=False)
    pack_s = time.perf_counter() - tic
    view = {"student": PreprocessCfg(224)}
    raw = samples_per_s(PairDataset(rows, view, seed=0), args.workers, args.batch, args.batches)
    packed = samples_per_s(PairDataset(rows, view, seed=0, reader=PackedImages(tmp / "pack")),
                           args.workers, args.batch, args.batches)
    print(f"{'loader':10} {'samples/s':>10}   ({len(rows)} {what}, 224 px, {args.workers} workers)")
    print(f"{'raw JPEG':10} {raw:10.0f}\n{'packed':10} {packed:10.0f}   x{packed / raw:.1f}")
    print(f"packing: {len(rows) / pack_s:.0f} images/s ({pack_s:.1f} s, once)")
    write_result(f"loader_throughput_w{args.workers}", torch.device("cpu") if not torch.cuda.is_available()
                 else torch.device("cuda"), args.out, ("PIL",), images=len(rows), data=what, workers=args.workers,
                 batch=args.batch, raw_samples_per_s=raw, packed_samples_per_s=packed, speedup=packed / raw,
                 pack_images_per_s=len(rows) / pack_s)
    return 0


if __name__ == "__main__":
    sys.exit(main())
