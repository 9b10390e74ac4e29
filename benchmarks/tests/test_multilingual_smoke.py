"""benchmarks/multilingual.py's smoke mode on the real Multi30k sentences (skipped when they are absent)."""
import json
from pathlib import Path

import pytest
import torch

from distill import create_student

ROOT = Path(__file__).resolve().parent.parent.parent
ASSETS = ROOT.parent / "shared" / "assets"
pytestmark = pytest.mark.benchmark_smoke


def _benchmark():
    import importlib.util

    path = ROOT / "benchmarks" / "multilingual.py"
    spec = importlib.util.spec_from_file_location("multilingual_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench



def _tiny_photo_teacher(folder: Path) -> None:
    """A tiny two-tower model on MiniLM's first block: a stand-in for quality_real.py's photo teacher."""
    torch.manual_seed(0)
    photo = create_student("vit_tiny+bert_small", embed_dim=384, image_size=32,
                           image_kwargs={"model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
                           text_kwargs={"pretrained": "minilm", "num_layers": 1})
    photo.save(folder)


@pytest.mark.skipif(not (ASSETS / "multi30k" / "parallel-train.csv").exists(), reason="real Multi30k assets absent")
def test_benchmark_smoke_writes_the_fields_the_issue_names(tmp_path):
    bench = _benchmark()
    _tiny_photo_teacher(tmp_path / "photo")
    bench.main(["--smoke", "--limit", "120", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                "--photo-teacher", str(tmp_path / "photo"), "--by-photo"])
    result = json.loads((tmp_path / "out" / "multilingual_smoke_cpu.json").read_text())
    # captions of the photo teacher's training photos were learnt; only its held-out photos' captions query
    assert result["by_photo"]["pairs"] > 0
    # the Chinese captions are much shorter than the English ones: the English cut to their length says less
    short, long_ = result["same_length"]["zh"], result["same_length"]["de"]
    assert short["cut_to"] < long_["cut_to"] and 4 <= short["cut_to"] <= 8, (short, long_)
    assert 0 <= short["teacher_r1"] <= short["teacher_r1_full_length"] <= 1
    for lang in ("de", "fr", "zh"):
        v = result["languages"][lang]
        assert set(v) == {"student_r1", "student_r5", "teacher_r1", "teacher_r5"}
        assert 0 <= v["student_r1"] <= v["student_r5"] <= 1
        assert set(result["scratch"]["languages"][lang]) == set(v)
    assert set(result["english"]) == {"student_r1", "teacher_r1"} and result["english"]["teacher_r1"] > 0.5
    photos = result["photos"]
    assert photos["photos"] == 200 and set(photos["languages"]) == {"en", "de", "fr", "zh"}
    assert photos["languages"]["zh"]["queries"] > 0
    assert photos["languages"]["de"]["queries"] > 0
    assert {"teacher_t2i_r1", "student_t2i_r5", "scratch_t2i_r1"} <= set(photos["languages"]["de"])
    assert result["params"]["student"] < result["params"]["teacher"]


@pytest.mark.skipif(not (ASSETS / "flickr8k-cn" / "flickr1k-zh.csv").exists(), reason="real Flickr8K-CN assets absent")
def test_captions_only_mode_writes_the_fields_the_issue_names(tmp_path):
    bench = _benchmark()
    _tiny_photo_teacher(tmp_path / "photo")
    bench.main(["--smoke", "--captions", str(ASSETS / "flickr8k-cn" / "flickr1k-zh.csv"), "--lang", "zh",
                "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--photo-teacher", str(tmp_path / "photo")])
    result = json.loads((tmp_path / "out" / "multilingual_captions_zh_smoke_cpu.json").read_text())
    zh = result["captions_only"]["zh"]
    assert {"student_r1", "student_r5", "teacher_r1", "teacher_r5", "photos", "queries"} <= set(zh)
    assert zh["photos"] == 200 and zh["queries"] == 1000 and zh["train_photos"] == 800
    assert 0 <= zh["student_r1"] <= zh["student_r5"] <= 1
