"""A student people can use elsewhere: a model card in every folder, configs that name no path of the machine
that wrote them, latency timed side by side, and errors that say what to do."""
import json
import re
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A teacher folder, a fit run from it, and the run's student evaluated (its report in the default place)."""
    from distill import create_student
    from distill.cli import main
    from distill.demo import make_shapes

    root = tmp_path_factory.mktemp("in_use")
    data = make_shapes(root / "data", n_train=24, n_test=8, size=32, seed=3)
    towers = dict(image_kwargs={"image_size": 32, "model_kwargs": dict(TINY_VIT)},
                  text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16})
    torch.manual_seed(0)
    create_student("vit_tiny+bert_small", embed_dim=32, **towers).save(root / "teachers" / "shapes_teacher")
    (root / "fit.yaml").write_text(
        f"teacher: {{name: {root / 'teachers' / 'shapes_teacher'}}}\n"
        f"student: {{name: vit_tiny+bert_small, kwargs: {json.dumps(towers)}}}\n"
        f"data: {{train: {data / 'train.csv'}, num_workers: 0}}\n"
        "optim: {warmup_steps: 1, lr: 0.002}\n"
        f"train: {{max_steps: 3, batch_size: 8, progress: false, health_every: 0, output_dir: {root / 'run'}}}\n")
    assert main(["fit", str(root / "fit.yaml")]) == 0
    assert main(["eval", "--student", str(root / "run"), "--data", str(data / "test.csv")]) == 0
    return root, data


FORMATS = ("safetensors", "onnx", "onnx-int8", "open_clip", "sentence-transformers", "timm")


@pytest.fixture(scope="module")
def exported(trained):
    from distill.export import export

    root, data = trained
    for fmt in FORMATS:
        export(root / "run", root / "exp" / fmt, format=fmt, data=str(data / "test.csv"))
    return root


def test_the_saved_student_has_a_model_card_with_teacher_data_recipe_and_evaluation(trained):
    root, _ = trained
    card = (root / "run" / "student" / "README.md").read_text()
    cfg = json.loads((root / "run" / "student" / "config.json").read_text())
    assert card.startswith("---\nlibrary_name: clip-distill\n")
    assert cfg["teacher"]["weights"] in card  # the teacher's identity
    assert f"fingerprint `{cfg['trained']['data']['fingerprint']}`" in card and "`train.csv`: 24 rows" in card
    assert "lr: 0.002" in card and "steps: 3" in card  # the recipe as it differs from the defaults
    results = json.loads((root / "run" / "student" / "eval" / "results.json").read_text())
    assert f"| student | {results['student']['params_image'] / 1e6:.2f}M |" in card  # the eval table
    assert "## Intended use and limits" in card


def test_every_export_has_a_card_naming_its_format_and_how_to_load_it(exported):
    loads = {"safetensors": 'load_student("safetensors")', "onnx": 'OnnxStudent("onnx")',
             "onnx-int8": 'OnnxStudent("onnx-int8")', "open_clip": 'create_model_and_transforms("local-dir:open_clip")',
             "sentence-transformers": 'SentenceTransformer("sentence-transformers")',
             "timm": 'timm.create_model("local-dir:timm", pretrained=True)'}
    for fmt in FORMATS:
        card = (exported / "exp" / fmt / "README.md").read_text()
        assert f"A clip-distill student ({fmt})" in card and loads[fmt] in card, fmt
        assert "| student |" in card, fmt  # the source's evaluation travels with it
        if fmt != "safetensors":
            parity = json.loads((exported / "exp" / fmt / "parity.json").read_text())
            first = next(v for v in parity.values() if isinstance(v, dict) and "mean_cosine" in v)
            assert f"{first['mean_cosine']:.5f}" in card, fmt
    assert "INT8 weights and activations" in (exported / "exp" / "onnx-int8" / "README.md").read_text()


def test_no_written_config_names_a_path_of_the_machine_that_wrote_it(exported, tmp_path):
    """Student and export folders hold no absolute path (open_clip's two documented keys aside), and a copied
    student still finds its teacher by the recorded relative path."""
    import shutil

    from distill import load_student

    root = exported
    absolute = re.compile(r"(?<![\w.])(/(?:tmp|root|home|usr|opt|work|var)/|[A-Za-z]:\\\\)")
    for folder in [root / "run" / "student", *(root / "exp").iterdir()]:
        for f in folder.rglob("*"):
            if f.suffix in (".json", ".md", ".yaml", ".txt") and f.is_file():
                text = f.read_text(errors="replace")
                if f.name == "open_clip_config.json":  # open_clip reads these two as they are (README)
                    cfg = json.loads(text)
                    text = json.dumps({k: v for k, v in cfg.items() if k not in ("model_cfg", "clip_distill")})
                assert not absolute.search(text), (f, absolute.search(text).group(0))
    # the student and its teacher moved together: the relative path still leads to the teacher
    shutil.copytree(root / "run" / "student", tmp_path / "moved" / "run" / "student")
    shutil.copytree(root / "teachers", tmp_path / "moved" / "teachers")
    moved = load_student(tmp_path / "moved" / "run" / "student")
    assert Path(moved.teacher_identity["path"]) == tmp_path / "moved" / "teachers" / "shapes_teacher"


def test_an_image_only_onnx_export_names_pair_teacher_when_asked_for_text(exported, tmp_path):
    from distill.errors import ModelError
    from distill.export import export
    from distill.runtime import OnnxStudent

    export(exported / "run", tmp_path / "img", format="onnx", towers=["image"])
    with pytest.raises(ModelError, match="--pair-teacher TEACHER"):
        OnnxStudent(tmp_path / "img").encode_text(["a photo of a dog"])


def test_a_moved_teachers_absence_is_named_with_the_flag_to_use(exported, tmp_path, capsys):
    import shutil

    from distill.cli import main

    shutil.copytree(exported / "run" / "student", tmp_path / "alone")  # copied without its teacher
    assert main(["eval", "--student", str(tmp_path / "alone"), "--data", "x.csv"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not there now" in err[0] and "pass --teacher" in err[0]


def test_latency_is_timed_side_by_side_so_a_slow_spell_does_not_pick_a_side(monkeypatch):
    """Two equally fast calls, and the machine 50x slower for a while: timed one after the other (as before),
    the slow spell falls on one of them; timed alternately, both medians are the same."""
    from distill import timing

    clock = {"t": 0.0, "calls": 0}

    def work():  # one call costs 1 unit, 50 during calls 26..40 of the run (the slow spell)
        clock["calls"] += 1
        clock["t"] += 50.0 if 26 <= clock["calls"] <= 40 else 1.0

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock["t"])
    sequential = [timing.seconds_per_call(work, warmup=3, repeat=20) for _ in range(2)]
    clock.update(t=0.0, calls=0)
    side_by_side = timing.compare({"teacher": work, "student": work}, warmup=3, rounds=21)
    assert sequential[1] / sequential[0] == 50.0  # the old way: "the teacher is 50x faster"
    assert side_by_side["teacher"] == side_by_side["student"] == 1.0
