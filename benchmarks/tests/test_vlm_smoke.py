"""benchmarks/vlm.py's smoke mode end to end (issue 27): generated stand-ins of the assets, quality_real's smoke
towers and a tiny random Llama in place of SmolLM2. Selected by .ci/run."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
pytestmark = pytest.mark.benchmark_smoke


def test_vlm_smoke_mode_writes_every_tower(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    from test_quality_real_smoke import make_assets
    from test_vlm import write_tiny_lm

    spec = importlib.util.spec_from_file_location("vlm_bench", ROOT / "benchmarks" / "vlm.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assets = make_assets(tmp_path)
    lm = write_tiny_lm(tmp_path / "lm", [f"photo {i} of a dog on the street" for i in range(20)])
    photos = tmp_path / "other_photos"
    photos.mkdir()
    for p in sorted((assets / "flickr1k" / "images").glob("*.jpg"))[:3]:
        (photos / p.name).write_bytes(p.read_bytes())
    assert bench.main(["--smoke", "--assets", str(assets), "--qr-work", str(tmp_path / "qr"), "--work",
                       str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--workers", "0", "--lm-workers", "0",
                       "--lm", str(lm), "--eval-photos", str(photos), "--tower", str(tmp_path / "qr" / "teacher" /
                                                                                      "model")]) == 0
    result = json.loads((tmp_path / "out" / "vlm_smoke_cpu.json").read_text())
    towers = result["towers"]
    assert set(towers) == {"teacher", "student_swapped", "student", "blind", "model"}
    for name, r in towers.items():
        for key in ("cider", "bleu4", "caption_to_photo_r1", "caption_to_photo_r5"):
            assert 0 <= r[key] <= (10 if key == "cider" else 1), (name, key)
    assert towers["blind"]["distinct_captions"] == 1  # one constant feature: one caption for every photo
    # the student started as the teacher's own tower (pretrained=<teacher folder>: trunk and head)
    saved = json.loads((tmp_path / "qr" / "image" / "vit_tiny_inherit" / "student" / "config.json").read_text())
    assert result["student"] == "vit_tiny_inherit" and saved["image"]["weights"].startswith("model/model.safetensors")
    assert towers["teacher"]["fidelity"] > 0.999 and towers["model"]["fidelity"] > 0.999  # --tower: the teacher
    assert all(-1 <= r["fidelity"] < 0.999 for k, r in towers.items() if k not in ("teacher", "model"))
    assert result["towers_info"]["student"]["macs_ratio"] == 1.0  # the same ViT at the same size
    assert set(result["eval_photos"]) == set(towers) and result["eval_photos"]["teacher"]["photos"] == 3
    for key in ("wall_s", "train_per_s", "peak_rss_mb"):
        assert isinstance(result[key], float), key
    assert set(result["targets"]["met"]) == {"student_cider", "student_r1", "vs_blind"}
