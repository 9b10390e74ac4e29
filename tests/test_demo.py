"""A smaller version of ``distill demo``: the student keeps >= 80% of the teacher's held-out
zero-shot accuracy with at most a third of its image-tower parameters."""
from distill.demo import DemoSizes, run_demo
from distill.report import format_table

SMALL = DemoSizes(n_train=1000, n_test=300, teacher_steps=150, student_steps=150, batch_size=64)


def test_small_demo_student_keeps_80_percent_of_teacher(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CLIP_DISTILL_CACHE", str(tmp_path / "cache"))
    r = run_demo(work_dir=tmp_path / "work", sizes=SMALL, seed=0, progress=False)
    print(format_table(r))
    t, s = r["teacher"], r["student"]
    assert t["zero_shot_top1"] > 0.25  # 24 classes: chance is 0.042
    assert s["zero_shot_top1"] >= 0.8 * t["zero_shot_top1"]
    assert s["params_image"] <= t["params_image"] / 3
    assert 0.8 < s["fidelity"] <= 1.0
    # the report next to the student shows the very numbers the demo printed
    from pathlib import Path

    md = Path(r["report"]).read_text()
    assert format_table(r, markdown=True) in md
    assert (Path(r["report"]).parent / "per_class.png").exists()
