import torch
import yaml

from conftest import TINY_OPENCLIP, TINY_VIT
from distill import load_student
from distill.cli import main


def test_help_lists_every_command(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("demo", "fit", "tune", "export", "list"):
        assert cmd in out


def test_fit_then_export_from_the_command_line(shapes, tmp_path, capsys):
    recipe = {
        "teacher": {"name": "openclip:tiny-test", "kwargs": {"model_cfg": TINY_OPENCLIP}},
        "student": {"name": "vit_tiny", "kwargs": {"image_size": 32, "model_kwargs": TINY_VIT}},
        "data": {"train": str(shapes / "train.csv"), "num_workers": 0},
        "train": {"max_steps": 4, "batch_size": 8, "progress": False},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out_dir = tmp_path / "run"
    assert main(["fit", str(path), f"train.output_dir={out_dir}", "optim.lr=1e-3"]) == 0
    saved = yaml.safe_load((out_dir / "recipe.yaml").read_text())
    assert saved["optim"]["lr"] == 1e-3 and saved["train"]["max_steps"] == 4
    assert main(["export", str(out_dir), "--out", str(tmp_path / "exp"), "--dtype", "fp16"]) == 0
    a, b = load_student(out_dir / "student"), load_student(tmp_path / "exp")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.encode_image(x), b.encode_image(x), atol=2e-2, rtol=0)
    size = lambda d: (d / "model.safetensors").stat().st_size  # noqa: E731
    assert size(tmp_path / "exp") < 0.6 * size(out_dir / "student")


def test_recipe_errors_exit_2_with_the_key(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("loss:\n  wieghts: {cosine: 1}\n")
    assert main(["fit", str(path)]) == 2
    assert "loss.wieghts: unknown key; did you mean loss.weights?" in capsys.readouterr().err
