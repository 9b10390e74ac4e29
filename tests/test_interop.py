"""Exports other libraries load as their own: open_clip (local-dir:), sentence-transformers, timm and
transformers' TimmWrapper. Each round trip loads the export with the real client, compares its
embeddings with the student's, moves the folder and loads it again."""
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
st = pytest.importorskip("sentence_transformers")
timm = pytest.importorskip("timm")

from conftest import TINY_VIT  # noqa: E402

TEXT = dict(hidden_size=32, num_layers=1, num_heads=2, context_length=16)
IMAGE = {  # name -> create_student kwargs
    "vit_tiny": dict(image_size=32, model_kwargs=dict(TINY_VIT)),  # custom size, patch, depth and width
    "resnet18": dict(image_size=32),
    "mobilevit_s": dict(image_size=32),
}
TEXTS = ["a red circle", "two blue squares on the left of a green triangle, all of them small", "café 🐶 三角形"]


def _student(name, embed_dim=32, **text):
    from distill import create_student

    torch.manual_seed(0)
    if name == "two_tower":
        return create_student("vit_tiny+bert_small", embed_dim=embed_dim, image_kwargs=IMAGE["vit_tiny"],
                              text_kwargs={**TEXT, **text}).eval()
    if name == "bert_small":
        return create_student("bert_small", embed_dim=embed_dim, **{**TEXT, **text}).eval()
    return create_student(name, embed_dim=embed_dim, **IMAGE[name]).eval()


def _pixels(student, n=3):
    s = student.preprocess.image_size
    return torch.randn(n, 3, s, s, generator=torch.Generator().manual_seed(1))


def _move(folder, tmp_path):
    dst = tmp_path / "moved" / "elsewhere"
    dst.parent.mkdir()
    shutil.move(str(folder), dst)
    assert not folder.exists()
    return dst


# -- open_clip -------------------------------------------------------------------------------------------
def _open_clip_embeddings(folder, pixels, texts):
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    with torch.no_grad():
        return (model.eval().encode_image(pixels, normalize=True),
                model.encode_text(tokenizer(texts), normalize=True), model.visual.preprocess_cfg)


def _assert_open_clip_equal(folder, student):
    pixels = _pixels(student)
    img, txt, pre = _open_clip_embeddings(folder, pixels, TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(img, student.encode_image(pixels), atol=1e-5, rtol=0)
        torch.testing.assert_close(txt, student.encode_text(TEXTS), atol=1e-5, rtol=0)
    p = student.preprocess
    assert tuple(pre["size"]) == (p.image_size, p.image_size) and list(pre["mean"]) == list(p.mean)
    assert list(pre["std"]) == list(p.std) and (pre["interpolation"], pre["resize_mode"]) == (p.interpolation, p.resize_mode)


@pytest.mark.parametrize("name", ["vit_tiny", "resnet18", "mobilevit_s", "two_tower"])
def test_open_clip_round_trip(name, teacher, tmp_path):
    from distill.export import export, pair_with_teacher_text
    from distill import load_student

    student = _student(name)
    if student.text is None:  # an image student + the open_clip teacher's own text tower
        student = pair_with_teacher_text(student, teacher)
    res = export(student, tmp_path / "oc", "open_clip")
    assert res.parity["image"]["mean_cosine"] > 0.9999 and res.parity["preprocess"]["config_match"]
    _assert_open_clip_equal(res.path, student)
    cfg = json.loads((res.path / "open_clip_config.json").read_text())["model_cfg"]
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    # default timm trunks and an open_clip teacher's text tower are named: open_clip loads them anywhere
    relocatable = name in ("resnet18", "mobilevit_s")
    assert (vision["timm_model_name"] == name) == relocatable and ("hf_model_name" in text) == (name == "two_tower")
    if not relocatable:  # custom model_kwargs: timm's own config with model_args, beside open_clip's
        assert vision["timm_model_name"] == f"local-dir:{(res.path / 'timm').resolve()}"
        assert json.loads((res.path / "timm" / "config.json").read_text())["model_args"]["depth"] == TINY_VIT["depth"]
    if name == "two_tower":
        assert (text["hf_pooler_type"], text["hf_proj_type"]) == ("mean_pooler", "linear")
    else:
        assert text == teacher.model_cfg["text_cfg"]

    moved = _move(res.path, tmp_path)
    if relocatable:
        _assert_open_clip_equal(moved, student)
    else:  # the library reads a moved export from its own files; exporting it again repoints open_clip
        again = load_student(moved)
        pixels = _pixels(student)
        with torch.no_grad():
            torch.testing.assert_close(again.encode_image(pixels), student.encode_image(pixels), atol=1e-6, rtol=0)
            torch.testing.assert_close(again.encode_text(TEXTS), student.encode_text(TEXTS), atol=1e-6, rtol=0)
        export(again, moved, "open_clip", overwrite=True)  # the student is in memory: replacing its folder is safe
        _assert_open_clip_equal(moved, student)


def test_open_clip_text_head_bias_folded_or_refused(tmp_path):
    from distill.export import ExportError, export

    # a student saved before text heads were bias-free: hidden 32 >= embed_dim 16, the bias folds exactly
    foldable = _student("two_tower", embed_dim=16, proj_bias=True)
    with torch.no_grad():
        foldable.text.proj.bias.normal_()
    export(foldable, tmp_path / "fold", "open_clip")
    _assert_open_clip_equal(tmp_path / "fold", foldable)
    # embed_dim 48 > hidden 32: the bias is outside the projection's span; no exact bias-free form
    wide = _student("two_tower", embed_dim=48, proj_bias=True)
    with torch.no_grad():
        wide.text.proj.bias.normal_()
    with pytest.raises(ExportError, match="cannot be folded exactly.*32-d encoder -> 48-d"):
        export(wide, tmp_path / "wide", "open_clip")
    # open_clip 3.3's max pooler fails on its own mask: refused, not exported
    with pytest.raises(ExportError, match="max pooling has no working open_clip pooler"):
        export(_student("two_tower", pooling="max"), tmp_path / "max", "open_clip")
    with pytest.raises(ExportError, match="needs an image and a text tower"):
        export(_student("resnet18"), tmp_path / "one", "open_clip")


# -- sentence-transformers -------------------------------------------------------------------------------
@pytest.mark.parametrize("name,pooling", [("bert_small", "mean"), ("bert_small", "max"), ("bert_small", "cls"),
                                          ("two_tower", "mean")])
def test_sentence_transformers_round_trip(name, pooling, tmp_path):
    from distill.export import export
    from distill import load_student

    student = _student(name, pooling=pooling)
    res = export(student, tmp_path / "st", "sentence-transformers")
    modules = json.loads((res.path / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert json.loads((res.path / "config.json").read_text())["model_type"] == "bert"  # what SentenceTransformer needs
    with torch.no_grad():
        want = student.encode_text(TEXTS).numpy()
    got = st.SentenceTransformer(str(res.path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert abs(got - want).max() < 1e-5
    moved = _move(res.path, tmp_path)
    got = st.SentenceTransformer(str(moved), device="cpu").encode(TEXTS, convert_to_numpy=True)
    assert abs(got - want).max() < 1e-5
    again = load_student(moved)  # one folder serves both
    assert again.text.pooling == pooling
    with torch.no_grad():
        assert abs(again.encode_text(TEXTS).numpy() - want).max() < 1e-6


def test_sentence_transformers_refuses_image_students(tmp_path):
    from distill.export import ExportError, export

    with pytest.raises(ExportError, match="needs a text tower"):
        export(_student("resnet18"), tmp_path / "st", "sentence-transformers")


# -- timm ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vit_tiny", "resnet18", "mobilevit_s", "two_tower"])
def test_timm_round_trip(name, tmp_path):
    from transformers import AutoModelForImageClassification

    from distill.export import export
    from distill import load_student

    student = _student(name)
    res = export(student, tmp_path / "timm", "timm")
    pixels = _pixels(student)
    with torch.no_grad():
        want = student.image_features(pixels)  # before normalisation
    moved = _move(res.path, tmp_path)
    cfg = json.loads((moved / "config.json").read_text())
    assert cfg["num_classes"] == 32 and cfg["pretrained_cfg"]["input_size"][-1] == student.preprocess.image_size
    with torch.no_grad():
        got = timm.create_model(f"local-dir:{moved}", pretrained=True).eval()(pixels)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        got = AutoModelForImageClassification.from_pretrained(str(moved)).eval()(pixel_values=pixels).logits
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_student(moved).image_features(pixels), want, atol=1e-6, rtol=0)


def test_timm_refuses_text_students(tmp_path):
    from distill.export import ExportError, export

    with pytest.raises(ExportError, match="needs an image tower"):
        export(_student("bert_small"), tmp_path / "t", "timm")


# -- pairing ---------------------------------------------------------------------------------------------
def _max_pooling_text_teacher(tmp_path):
    """A text: teacher read from a sentence-transformers folder (written by hand) with max pooling."""
    import transformers

    from distill import load_teacher
    from distill.students.text import bert_tokenizer

    folder = tmp_path / "st_max"
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(folder)
    bert_tokenizer().save_pretrained(str(folder))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                  "pooling_mode_max_tokens": True}))
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    teacher = load_teacher(f"text:{folder}")
    assert teacher.pooling == "max"
    return teacher


def test_pairing_keeps_the_teachers_text_embeddings(teacher, tmp_path):
    from distill.export import ExportError, pair_with_teacher_text
    from distill import load_student

    text_teacher = _max_pooling_text_teacher(tmp_path)
    for t in (text_teacher, teacher):  # text: (max pooling) and open_clip teachers
        image = _student("resnet18", embed_dim=t.embed_dim)
        paired = pair_with_teacher_text(image, t)
        assert paired.text.pooling == ("max" if t.backend == "text" else "argmax")
        with torch.no_grad():
            torch.testing.assert_close(paired.encode_text(TEXTS), t.encode_text(TEXTS), atol=1e-6, rtol=0)
            again = load_student(paired.save(tmp_path / f"pair_{t.backend}"))
            torch.testing.assert_close(again.encode_text(TEXTS), t.encode_text(TEXTS), atol=1e-6, rtol=0)
    bad = copy.deepcopy(text_teacher)
    bad.pooling = "weightedmean"
    with pytest.raises(ExportError, match="weightedmean pooling cannot be kept"):
        pair_with_teacher_text(_student("resnet18", embed_dim=32), bad)


def test_cli_exports_each_format(teacher, tmp_path, capsys):
    from distill.cli import main

    folder = _student("two_tower").save(tmp_path / "s")
    for fmt in ("open_clip", "sentence-transformers", "timm"):
        assert main(["export", str(folder), "--format", fmt, "--out", str(tmp_path / fmt)]) == 0
        assert json.loads((tmp_path / fmt / "parity.json").read_text())["threshold"] == 0.9999
    assert "text: mean cosine to PyTorch 1.00000" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "s"), "--format", "open_clip", "--towers", "image",
                 "--out", str(tmp_path / "x")]) == 2  # a library error, one line


# -- the same pixels everywhere (issue 26) -------------------------------------------------------------------
def test_the_eval_crop_is_clips_resize_then_centre_crop():
    """Resize the short side, then centre-crop, with torchvision's rounding: the pixels CLIP's and open_clip's
    preprocessing give, on odd sizes and both orientations."""
    from PIL import Image
    from torchvision import transforms as T

    from distill.transforms import PreprocessCfg, eval_array

    rng = np.random.default_rng(0)
    for w, h, size in ((500, 333, 224), (333, 500, 96), (97, 61, 64), (640, 427, 260), (64, 64, 64)):
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).resize((w, h))
        cfg = PreprocessCfg(size, (0.0,) * 3, (1.0,) * 3, "bicubic")
        ref = T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                         T.PILToTensor()])(im).numpy() / 255.0
        got = eval_array(im, cfg)
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 3 / 255, (w, h, size, np.abs(got - ref).max())


ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"


@pytest.mark.skipif(not (ASSETS / "flickr1k" / "captions.csv").exists(), reason="real photos absent")
def test_open_clip_export_gives_the_students_embeddings_through_open_clips_preprocessing(tmp_path):
    import csv

    from distill.export import export

    photos = sorted((ASSETS / "flickr1k" / "images").iterdir())[:40]
    with open(tmp_path / "photos.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *[(str(p), "a photo") for p in photos]])
    student = _student("two_tower")
    res = export(student, tmp_path / "oc", "open_clip", data=str(tmp_path / "photos.csv"))
    p = res.parity["preprocess"]
    assert p["config_match"] and p["n"] == 40 and p["min_cosine"] >= 0.999 and p["max_pixel_diff"] < 0.1
