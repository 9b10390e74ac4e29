import json

import pytest
import torch

from conftest import tiny_student
from distill.data import load_rows
from distill.eval import (evaluate_pair, fidelity, knn_overlap, macs, retrieval_recall, zero_shot_accuracy,
                          zero_shot_per_class)
from distill.health import HealthCheck, mean_pairwise_cosine
from distill.report import format_table, write_report

E = torch.eye(6)


def test_retrieval_known_answers():
    pairs = [(i, i) for i in range(6)]
    ident = retrieval_recall(E, E, pairs)
    assert ident["i2t_r1"] == 1.0 and ident["t2i_r1"] == 1.0
    perm = retrieval_recall(E, E.roll(1, 0), pairs)  # every image's best text is another image's
    assert perm["i2t_r1"] == 0.0 and perm["t2i_r1"] == 0.0
    # several captions per image: any of them counts
    two = retrieval_recall(E[:3], E[[0, 0, 1, 1, 2, 2]], [(i, 2 * i) for i in range(3)] + [(i, 2 * i + 1) for i in range(3)])
    assert two["i2t_r1"] == 1.0


def test_zero_shot_fidelity_and_neighbours():
    labels = [0, 1, 2, 2]
    img = torch.stack([E[0], E[1], E[2], 0.9 * E[0] + 0.1 * E[2]])  # last: wrong at top-1, right at top-2
    acc = zero_shot_accuracy(img, labels, E[:3], topk=(1, 2))
    assert acc["top1"] == 0.75 and acc["top2"] == 1.0
    assert zero_shot_per_class(img, labels, E[:3]) == [1.0, 1.0, 0.5]
    assert fidelity(E, E) == pytest.approx(1.0) and fidelity(E, -E) == pytest.approx(-1.0)
    x = torch.randn(20, 8)
    assert knn_overlap(x, x) == 1.0
    assert knn_overlap(x, torch.randn(20, 8)) < 0.9
    lin = torch.nn.Linear(10, 4, bias=False)
    assert macs(lin, torch.randn(3, 10)) == 3 * 10 * 4


def test_collapse_and_chance_alarms(shapes, teacher, tmp_path):
    rows = load_rows(shapes / "test.csv")
    images = list(dict.fromkeys(rows.images))
    t_txt = teacher.encode_text(list(dict.fromkeys(rows.captions)))
    check = HealthCheck(rows, None, t_txt, warmup_steps=10, out_file=tmp_path / "health.jsonl")
    constant = tiny_student()
    with torch.no_grad():
        constant.image.proj.weight.zero_()
        constant.image.proj.bias.fill_(0.3)
    alarms = check(constant, step=20)
    assert any("COLLAPSED" in a for a in alarms) and any("CHANCE" in a for a in alarms)
    assert not [a for a in check(constant, step=5) if "CHANCE" in a]  # not during warm-up
    logged = [json.loads(l) for l in (tmp_path / "health.jsonl").read_text().splitlines()]
    assert logged[0]["mean_pairwise_cosine"] == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(5)) == pytest.approx(0.0)
    # a teacher whose image and text embeddings do not match is flagged
    torch.manual_seed(0)  # random embeddings: the same ones whatever ran before in this process
    bad = HealthCheck(rows, torch.randn(len(images), t_txt.shape[1]), t_txt)
    assert bad.teacher_alarms() and "TEACHER is at chance" in bad.teacher_alarms()[0]
    good = HealthCheck(rows, t_txt[[list(dict.fromkeys(rows.captions)).index(c) for c in
                                    [rows.captions[rows.images.index(i)] for i in images]]], t_txt)
    assert good.teacher_alarms() == []


def test_report_files_and_pngs(shapes, teacher, tmp_path):
    from PIL import Image

    from distill import Distiller

    run = Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "run"), max_steps=4, batch_size=16,
                    num_workers=0, progress=False, log_every=1).fit(str(shapes / "train.csv"))
    test = load_rows(shapes / "test.csv")
    assert test.labels and test.classes and len(test.classes) == 24  # label column + classes.csv
    res = evaluate_pair(teacher, run.student.eval(), captions=test, classes=test, templates=("a {}",))
    for key in ("zero_shot_top1", "zero_shot_top5", "i2t_r1", "t2i_r10", "params_image", "macs_image",
                "latency_ms_b1", "images_per_s"):
        assert key in res["teacher"] and key in res["student"], key
    assert len(res["cosines"]) == 40 and all(-1 <= c <= 1 for c in res["cosines"])
    assert res["student"]["fidelity"] == pytest.approx(sum(res["cosines"]) / 40)  # the mean of the per-image ones
    report = write_report(res, tmp_path / "rep", run_dir=run.output_dir)
    for png in ("loss.png", "per_class.png", "cosine_hist.png"):
        with Image.open(tmp_path / "rep" / png) as im:
            im.verify()
            assert im.size[0] > 100
    md = report.read_text()
    assert format_table(res, markdown=True) in md and "| red circle |" in md
    assert json.loads((tmp_path / "rep" / "results.json").read_text())["student"]["i2t_r1"] == res["student"]["i2t_r1"]


def test_eval_cli_uses_the_recorded_teacher(shapes, tmp_path, capsys):
    from distill import Distiller, create_student
    from distill.cli import main

    model = create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    model.save(tmp_path / "teacher")
    run = Distiller(str(tmp_path / "teacher"), tiny_student(), output_dir=str(tmp_path / "run"), max_steps=3,
                    batch_size=16, num_workers=0, progress=False).fit(str(shapes / "train.csv"))
    assert main(["eval", "--student", str(run.output_dir), "--data", str(shapes / "test.csv"),
                 "--classes", str(shapes / "test.csv"), "--templates", "simple", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "zero_shot_top1" in out and "student/teacher" in out
    res = json.loads((run.model_dir / "eval" / "results.json").read_text())
    assert set(res["per_class"]) == set(load_rows(shapes / "test.csv").classes)
