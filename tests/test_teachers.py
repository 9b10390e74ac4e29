import pytest
import torch

from conftest import TINY_OPENCLIP
from distill import load_teacher
from distill.teachers import list_teachers

IDENTITY_KEYS = {"backend", "name", "weights", "embed_dim", "image_size", "mean", "std", "context_length"}


def _check_frozen(t):
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    assert not any(p.requires_grad for p in t.parameters())
    x = torch.randn(2, 3, t.preprocess.image_size, t.preprocess.image_size, requires_grad=True)
    z = t.encode_image(x)
    assert not z.requires_grad
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    assert IDENTITY_KEYS <= set(t.identity)


def test_open_clip_teacher(teacher):
    _check_frozen(teacher)
    assert teacher.embed_dim == 32 and teacher.preprocess.image_size == 32
    z = teacher.encode_text(["a dog", "a cat"])
    assert z.shape == (2, 32)
    torch.testing.assert_close(teacher.encode_text(teacher.tokenize(["a dog"])), z[:1])
    assert teacher.identity["backend"] == "openclip" and teacher.identity["context_length"] == 24
    torch.manual_seed(123)
    other = load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)
    assert other.identity["weights"] != teacher.identity["weights"]  # different weights, different identity


def test_open_clip_teacher_from_local_weights_file(teacher, tmp_path):
    torch.save(teacher.model.state_dict(), tmp_path / "w.pt")
    again = load_teacher("openclip:tiny-test", pretrained=str(tmp_path / "w.pt"), model_cfg=TINY_OPENCLIP)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(again.encode_image(x), teacher.encode_image(x))
    assert again.identity["weights"].startswith("sha256:")


def _tiny_hf_clip(path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2),
        projection_dim=24)
    torch.manual_seed(0)
    transformers.CLIPModel(cfg).save_pretrained(path)


def test_hf_clip_teacher_with_bpe_fallback(tmp_path):
    _tiny_hf_clip(tmp_path / "clip")
    t = load_teacher(f"hf:{tmp_path / 'clip'}")
    _check_frozen(t)
    assert t.embed_dim == 24 and t.identity["backend"] == "hf"
    import open_clip

    ids = t.tokenize(["a photo of a dog"])["input_ids"]
    assert torch.equal(ids, open_clip.tokenize(["a photo of a dog"], context_length=77))
    assert t.encode_text(["a photo of a dog", "a cat"]).shape == (2, 24)


def test_folder_teacher_round_trip(tmp_path):
    from distill import create_student

    model = create_student("vit_tiny+bert_small", embed_dim=16, image_kwargs={"image_size": 32},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    model.save(tmp_path / "m")
    t = load_teacher(str(tmp_path / "m"))
    _check_frozen(t)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(t.encode_image(x), model.encode_image(x))
    assert t.identity["backend"] == "folder" and t.identity["weights"].startswith("sha256:")


def test_presets_are_registered_and_unknown_names_fail():
    assert {"openclip_vit_b32", "openai_clip_vit_b32"} <= set(list_teachers())
    with pytest.raises(KeyError, match="openclip_vit_b32"):
        load_teacher("openclip_vit_b23")
