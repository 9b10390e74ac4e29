"""Teacher-cache throughput for a ViT-B/32-sized teacher (open_clip ViT-B-32, random weights:
speed does not depend on them), against the plain loop a user writes today (DataLoader +
``model.encode_image`` in fp32, batch 64), and student epoch time from the cache vs the online teacher.

    python benchmarks/cache_throughput.py                  # CPU: 256 images; GPU: 8192 images
    python benchmarks/cache_throughput.py --images 2048 --workers 16

Images are generated 256x256 JPEGs (decoding cost like small web photos). Prints a table and
writes benchmarks/results/cache_throughput_<device>.json.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from _results import write_result
from distill import Distiller, create_student, load_teacher
from distill.cache import TeacherService
from distill.data import open_image


def make_images(folder: Path, n: int, size: int = 256) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(n):
        im = Image.fromarray(rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)).resize((size, size))
        d = ImageDraw.Draw(im)
        x, y = rng.integers(0, size - 64, 2)
        d.ellipse([x, y, x + 64, y + 64], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        im.save(folder / f"{i:06d}.jpg", quality=90)
        lines.append(f"{i:06d}.jpg,a photo of object number {i % 997}")
    (folder / "pairs.csv").write_text("\n".join(lines) + "\n")
    return folder / "pairs.csv"


class _Plain(torch.utils.data.Dataset):
    def __init__(self, paths, transform):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.transform(open_image(self.paths[i]))


@torch.no_grad()
def plain_loop(teacher, paths, device, workers) -> float:
    """What users write today: fp32, batch 64, one view (images only)."""
    loader = torch.utils.data.DataLoader(_Plain(paths, teacher.image_transform), batch_size=64, num_workers=workers)
    teacher.to(device)
    tic = time.perf_counter()
    for x in loader:
        teacher.model.encode_image(x.to(device)).cpu()
    return len(paths) / (time.perf_counter() - tic)


def student_epoch(teacher, data, cache_dir, device, n, batch, workers, tmp) -> dict[str, float]:
    out = {}
    for mode in ("online", "cache"):
        torch.manual_seed(0)
        student = create_student("vit_tiny", embed_dim=teacher.embed_dim)
        opts = dict(output_dir=str(tmp / f"run_{mode}"), max_steps=max(2, n // batch), batch_size=batch,
                    num_workers=workers, progress=False, warmup_steps=1, cpu=device.type == "cpu")
        if mode == "cache":
            r = Distiller(None, student, cache=str(cache_dir), **opts).fit(data)
        else:
            r = Distiller(teacher, student, **opts).fit(data)
        out[f"student_{mode}_per_s"] = r.extra["samples_per_s"]
        out[f"student_{mode}_epoch_s"] = n / r.extra["samples_per_s"]
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--images", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="cache build batch (default 256 GPU / 64 CPU)")
    p.add_argument("--student-batch", type=int, default=None)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    n = args.images or (8192 if gpu else 256)
    workers = args.workers if args.workers is not None else (12 if gpu else 2)
    batch = args.batch_size or (256 if gpu else 64)
    tmp = Path(tempfile.mkdtemp(prefix="cache_bench_"))
    try:
        data = make_images(tmp / "images", n)
        paths = sorted(str(f) for f in (tmp / "images").glob("*.jpg"))
        teacher = load_teacher("openclip:ViT-B-32")  # random init: offline, same cost
        row = {"images": n, "workers": workers, "build_batch": batch}
        row["plain_fp32_b64_per_s"] = plain_loop(teacher, paths, device, workers)
        for views in (1, 4):
            svc = TeacherService(teacher, tmp / f"cache_v{views}", batch_size=batch, num_workers=workers,
                                 device=device, shard_size=4096, progress=False)
            s = svc.build(str(data), views=views)
            row[f"cache_build_v{views}_views_per_s"] = s.images_per_s
            row[f"cache_build_v{views}_images_per_s"] = s.images_encoded / s.image_seconds
            row[f"cache_build_v{views}_total_s"] = s.seconds  # images + captions + manifest
        sb = args.student_batch or (256 if gpu else 32)
        sn = n if gpu else 128
        row.update(student_epoch(teacher, str(data), tmp / "cache_v1", device, sn, sb, workers, tmp))
        row["student_batch"], row["student_images"] = sb, sn
        row["speedup_build_vs_plain"] = row["cache_build_v1_images_per_s"] / row["plain_fp32_b64_per_s"]
        row["speedup_student_cache_vs_online"] = row["student_cache_per_s"] / row["student_online_per_s"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for k, v in row.items():
        print(f"{k:<36} {v:>12,.2f}" if isinstance(v, float) else f"{k:<36} {v:>12}")
    write_result("cache_throughput", device, args.out, ("open_clip",),
                 teacher="open_clip ViT-B-32 (random weights), 224 px", result=row)

if __name__ == "__main__":
    main()
