"""The benchmarks' smoke modes end to end on generated stand-ins of the real assets: benchmarks/quality_real.py's
image track and benchmarks/token_reduction.py. Selected by .ci/run (the library's own tests never import a
benchmark script)."""
import csv
import importlib.util
import json
import tarfile
from pathlib import Path

import numpy as np

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.benchmark_smoke


def _photo(path: Path, rng, size=(48, 40)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _tar(folder: Path, out: Path, arcname: str):
    with tarfile.open(out, "w:gz") as tar:
        tar.add(folder, arcname=arcname)


def make_assets(root: Path) -> Path:
    """The layout of ../shared/assets (see its README), a few random images each."""
    rng = np.random.default_rng(0)
    flickr = root / "assets" / "flickr1k"
    rows = []
    for i in range(10):
        _photo(flickr / "images" / f"{i}.jpg", rng)
        rows += [(f"images/{i}.jpg", f"photo {i} of a {w}") for w in ("dog", "street")]
    with open(flickr / "captions.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    with open(root / "assets" / "flickr8k-text-only.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image_id", "caption"), *[(f"x{i}", f"a dog number {i} runs") for i in range(24)]])
    for c in ("cat", "ship", "truck"):
        for i in range(12):
            _photo(root / "cifar" / "train" / c / f"{i}.jpg", rng, (32, 32))
    _tar(root / "cifar" / "train", root / "assets" / "cifar10-train.tar.gz", "train")
    nette = root / "nette" / "imagenette"
    for wnid in ("n01440764", "n03028079", "n03888257"):
        for split, n in (("train", 4), ("val", 2)):
            for i in range(n):
                _photo(nette / split / wnid / f"{i}.jpg", rng, (40, 40))
    (nette / "classes.csv").write_text("folder,class\nn01440764,tench\nn03028079,church\nn03888257,parachute\n")
    _tar(nette, root / "assets" / "imagenette-160.tar.gz", "imagenette")
    return root / "assets"


def test_smoke_mode_runs_and_writes_every_field(tmp_path):
    spec = importlib.util.spec_from_file_location("quality_real", ROOT / "benchmarks" / "quality_real.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assets = make_assets(tmp_path)
    assert bench.main(["--smoke", "--tracks", "image", "--assets", str(assets), "--work", str(tmp_path / "work"),
                       "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    result = json.loads((tmp_path / "out" / "quality_real_smoke.json").read_text())
    image = result["tracks"]["image"]
    for row in (image["teacher"], *image["students"].values()):
        for key in ("params_image", "macs_image", "per_s", "zero_shot_top1", "imagenette_top1", "i2t_r1", "i2t_r5",
                    "t2i_r1", "t2i_r5"):
            assert isinstance(row[key], (int, float)) and row[key] >= 0, key
    student = image["students"]["vit_tiny"]
    assert [p["step"] for p in student["curve"]] == [1, 2] and 0 < student["macs_ratio"]


def test_token_reduction_smoke_mode_writes_the_runs(tmp_path):
    """benchmarks/token_reduction.py (issue 18) end to end on the same stand-ins: every run, its stages'
    rates from log.jsonl, and the targets judged on them."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("token_reduction", ROOT / "benchmarks" / "token_reduction.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assets = make_assets(tmp_path)
    assert bench.main(["--smoke", "--assets", str(assets), "--qr-work", str(tmp_path / "qr"), "--work",
                       str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    result = json.loads((tmp_path / "out" / "token_reduction_smoke_cpu.json").read_text())
    runs = {(r["tower"], r["name"]): r for r in result["runs"]}
    assert set(runs) == {("image", "full"), ("image", "random_0.5"), ("image", "resize_half"),
                         ("text", "full"), ("text", "syntax_8"), ("text", "truncate_8")}
    for key, r in runs.items():  # rates are timings: present, never asserted (no test depends on the clock)
        assert isinstance(r["train_per_s"], float) and isinstance(r["wall_s"], float), key
        assert 0.0 <= r["score"] <= 1.0 and len(r["stages"]) == (1 if r["name"] == "full" else 2), key
    staged = json.loads((tmp_path / "work" / "image" / "random_0.5" / "log.jsonl").read_text().splitlines()[-1])
    assert staged["stage"] == 2 and staged["step"] == sum(runs[("image", "random_0.5")]["steps"])
    assert {"image_random_0.5_speedup", "text_syntax_8_speedup"} <= set(result["targets"])
