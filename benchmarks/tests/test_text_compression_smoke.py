"""benchmarks/text_students.py --compression in smoke mode on the real corpora (skipped when they are absent)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ASSETS = ROOT.parent / "shared" / "assets"
pytestmark = pytest.mark.benchmark_smoke


@pytest.mark.skipif(not (ASSETS / "flickr8k-text-only.csv").exists(), reason="real caption corpora absent")
def test_compression_smoke_writes_the_fields_the_issue_names(tmp_path):
    spec = importlib.util.spec_from_file_location("text_students_bench", ROOT / "benchmarks" / "text_students.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    extra = tmp_path / "mine.csv"  # another caption set: group,caption, no photos
    extra.write_text("group,caption\n1,a dog runs on the grass\n1,a brown dog running outside\n"
                     "2,two children play in a park\n2,kids playing on the grass in a park\n", encoding="utf-8")
    bench.main(["--compression", "--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"),
                "--eval-captions", str(extra)])
    result = json.loads((tmp_path / "out" / "text_compression_smoke_cpu.json").read_text())
    assert result["teacher"]["r1"] > 0.5 and result["teacher"]["embedding_params"] == 30522 * 384
    s = result["students"]["tiny"]
    assert {"params", "embedding_params", "r1", "r5", "fidelity", "captions_per_s_b256", "latency_ms_b1",
            "onnx_int8_r1"} <= set(s)
    assert s["params"] < result["teacher"]["params"] / 10 and s["embedding_params"] == s["vocab"]["kept"] * 64
    assert 0 <= s["r1"] <= s["r5"] <= 1 and 0 <= s["onnx_int8_r1"] <= 1
    assert set(result["extra"]["mine"]) == {"teacher", "tiny"}
    assert result["extra"]["mine"]["teacher"]["r1"] == 1.0  # each caption finds its pair among four
    with open(ASSETS / "flickr1k" / "captions.csv", encoding="utf-8") as f:
        test = {r["caption"].strip().lower() for r in csv.DictReader(f)}
    with open(result["corpus"]["file"], encoding="utf-8") as f:
        corpus = [r["caption"].lower() for r in csv.DictReader(f)]
    assert len(corpus) == 200 and not test & set(corpus)  # no test caption is trained on
