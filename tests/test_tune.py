"""Teacher adaptation: text teachers, lock modes, LoRA, tuned folders as teachers."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_VIT

TINY_BERT = dict(hidden_size=32, num_layers=1, num_heads=2, context_length=16)


def two_tower(seed=0):
    from distill import create_student

    torch.manual_seed(seed)
    return create_student("vit_tiny+bert_small", embed_dim=32,
                          image_kwargs=dict(image_size=32, model_kwargs=dict(TINY_VIT)), text_kwargs=TINY_BERT)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def tune(model, shapes, tmp_path, **kw):
    from distill import Tuner

    opts = dict(max_steps=4, batch_size=16, lr=5e-3, warmup_steps=1, num_workers=0, progress=False,
                cpu=True, output_dir=str(tmp_path / "tune"), image_size=32)
    opts.update(kw)
    return Tuner(model, **opts).fit(str(shapes / "train.csv"))


def test_text_teacher_matches_hand_written_mean_pool():
    transformers = pytest.importorskip("transformers")
    from distill import load_teacher
    from distill.students.text import minilm_dir

    teacher = load_teacher("text:minilm")
    folder = minilm_dir()
    assert teacher.pooling == "mean" and teacher.embed_dim == 384 and not teacher.has_image
    texts = ["a dog runs across the grass", "两个孩子在海滩上玩耍 🏖️", ""]
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    enc = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = enc(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    got = teacher.encode_text(texts)
    assert torch.allclose(got, expected, atol=1e-5)
    assert teacher.identity["weights"].startswith("sha256:")


def test_text_teacher_reads_sentence_transformers_pooling(tmp_path):
    transformers = pytest.importorskip("transformers")
    from distill import load_teacher
    from distill.students.text import BERT_TOKENIZER

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(str(BERT_TOKENIZER)).save_pretrained(str(tmp_path))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    (tmp_path / "modules.json").write_text(json.dumps([{"idx": 1, "path": "1_Pooling", "type": "x.Pooling"}]))
    teacher = load_teacher(f"text:{tmp_path}")
    assert teacher.pooling == "cls" and teacher.embed_dim == 32
    tokens = teacher.tokenize(["a red square"])
    with torch.no_grad():
        cls = teacher.encoder(**tokens).last_hidden_state[:, 0]
    assert torch.allclose(teacher.encode_text(["a red square"]), F.normalize(cls, dim=-1), atol=1e-6)


@pytest.mark.parametrize("lock", ["text", "image"])
def test_lock_modes_leave_the_locked_tower_untouched(lock, shapes, tmp_path):
    model = two_tower()
    before_img, before_txt = snapshot(model.image), snapshot(model.text)
    result = tune(model, shapes, tmp_path, lock=lock)
    assert all(map(lambda v: v == v, result.history["loss"]))
    locked, trained = (model.text, model.image) if lock == "text" else (model.image, model.text)
    before_locked, before_trained = (before_txt, before_img) if lock == "text" else (before_img, before_txt)
    assert same(before_locked, snapshot(locked))
    assert not same(before_trained, snapshot(trained))


def test_lit_with_queue_reloads_as_a_teacher_with_new_identity(shapes, tmp_path):
    from distill import load_teacher

    model = two_tower()
    model.save(tmp_path / "untuned")
    untuned = load_teacher(str(tmp_path / "untuned"))
    result = tune(model, shapes, tmp_path, lock="text", queue=48, max_steps=6)
    teacher = load_teacher(str(result.model_dir))
    assert teacher.identity["weights"] != untuned.identity["weights"]
    texts = ["a red circle", "a blue square"]
    model.eval()
    with torch.no_grad():
        expected = model.encode_text(texts)
        pix = torch.rand(3, 3, 32, 32)
        assert torch.allclose(teacher.encode_image(pix), model.encode_image(pix), atol=1e-5)
    assert torch.allclose(teacher.encode_text(texts), expected, atol=1e-5)


def test_lora_trains_only_adapters_and_heads_and_merges_exactly(shapes, tmp_path):
    pytest.importorskip("peft")
    from distill import load_student
    from distill.tune import add_lora, merge_lora

    model = two_tower()
    trainable = add_lora(model, "both", rank=4)
    assert trainable and all("lora_" in n or ".proj." in n for n in trainable)
    assert any(n.startswith("image.") and "lora_" in n for n in trainable)
    assert any(n.startswith("text.") and "lora_" in n for n in trainable)
    torch.manual_seed(1)
    for n, p in model.named_parameters():
        if "lora_B" in n:  # peft starts B at zero; make the adapters do something
            p.data.normal_(0, 0.1)
    model.eval()
    pix, texts = torch.rand(2, 3, 32, 32), ["a green triangle", "two yellow circles"]
    with torch.no_grad():
        adapted = (model.encode_image(pix), model.encode_text(texts))
    merge_lora(model)
    assert not any("lora_" in n for n, _ in model.named_parameters())
    loaded = load_student(model.save(tmp_path / "merged"))
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(pix), adapted[0], atol=1e-5)
        assert torch.allclose(loaded.encode_text(texts), adapted[1], atol=1e-5)


def test_lora_tuning_changes_the_model_through_adapters_only(shapes, tmp_path):
    pytest.importorskip("peft")
    from distill import load_teacher

    model = two_tower()
    text_before, image_before = snapshot(model.text), snapshot(model.image.trunk)
    pix = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        emb_before = model.eval().encode_image(pix)
    result = tune(model, shapes, tmp_path, lock="lora", lora_rank=4, lora_towers="image", max_steps=6)
    # the text tower got no adapters: its trunk is byte-identical, only its head trained
    after = snapshot(model.text)
    assert all(torch.equal(after[k], v) for k, v in text_before.items() if not k.startswith("proj."))
    assert not torch.equal(after["proj.weight"], text_before["proj.weight"])
    # the image tower changed, and only through the adapters: merged weights differ from the base ones by
    # exactly the low-rank update of the Linear layers that got adapters; nothing else moved
    merged = snapshot(model.image.trunk)
    changed = [k for k in image_before if not torch.equal(merged[k], image_before[k])]
    assert changed and all(k.endswith(".weight") and merged[k].ndim == 2 for k in changed)
    for k in changed:
        assert torch.linalg.matrix_rank(merged[k] - image_before[k]).item() <= 4  # rank-4 adapters
    with torch.no_grad():
        emb_after = model.eval().encode_image(pix)
    assert float(torch.nn.functional.cosine_similarity(emb_before, emb_after).mean()) < 0.9999
    teacher = load_teacher(str(result.model_dir))
    assert torch.allclose(teacher.encode_text(["a red circle"]), model.eval().encode_text(["a red circle"]), atol=1e-5)
    assert torch.allclose(teacher.encode_image(pix), emb_after, atol=1e-5)


def test_clip_loss_shares_targets_among_equal_captions():
    from distill.tune import EmbeddingQueue, caption_ids, clip_loss

    torch.manual_seed(0)
    txt = F.normalize(torch.randn(2, 8), dim=-1)
    captions = ["a cat", "a dog", "a cat", "a dog"]
    img = txt[[0, 1, 0, 1]]  # images equal to their class text
    scale = torch.tensor(3.0)
    ids = caption_ids(captions)
    aware = clip_loss(img, txt[[0, 1, 0, 1]], scale, ids)
    naive = clip_loss(img, txt[[0, 1, 0, 1]], scale)
    assert aware < naive  # duplicates are not punished as negatives
    q = EmbeddingQueue(3)
    q.push(torch.randn(2, 8), torch.tensor([5, 6]))
    q.push(torch.randn(2, 8), torch.tensor([7, 8]))
    assert q.emb.shape == (3, 8) and q.ids.tolist() == [7, 8, 5]
    with_queue = clip_loss(img, txt[[0, 1, 0, 1]], scale, ids, q.get("text"))
    assert with_queue > aware  # more negatives, harder task


def test_tuner_rejects_bad_options(shapes):
    from distill import Tuner
    from distill.config import RecipeError

    with pytest.raises(ValueError, match="tune.lock"):
        Tuner(two_tower(), lock="half")
    with pytest.raises(ValueError, match="tune.queue"):
        Tuner(two_tower(), lock="none", queue=16)
    with pytest.raises(RecipeError, match="lora_rnak"):
        Tuner(two_tower(), lora_rnak=4)


def test_tuning_refuses_length_grouped_batches(shapes, tmp_path):
    from distill.config import RecipeError

    with pytest.raises(RecipeError, match="data.group_by_length: .*random batches"):
        tune(two_tower(), shapes, tmp_path, group_by_length=True)


def test_composite_openclip_image_tower_saves_and_reloads(tmp_path):
    from conftest import TINY_OPENCLIP
    from distill import create_student, load_teacher

    torch.manual_seed(0)
    model = create_student("openclip:tiny-test+bert_small", embed_dim=32,
                           image_kwargs=dict(model_cfg=TINY_OPENCLIP), text_kwargs=TINY_BERT).eval()
    assert model.image.preprocess.image_size == 32
    teacher = load_teacher(str(model.save(tmp_path / "composite")))
    pix = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher.encode_image(pix), model.encode_image(pix), atol=1e-6)


def trunks(model):
    return snapshot(model.image.trunk), snapshot(model.text.encoder)


def test_lock_both_trains_only_the_heads_from_features_computed_once(shapes, tmp_path, monkeypatch):
    from PIL import Image

    from distill import Tuner
    from distill.data import load_rows
    from distill.transforms import eval_transform

    model = two_tower()
    image_before, text_before = trunks(model)
    heads_before = snapshot(model.image.proj), snapshot(model.text.proj)
    result = tune(model, shapes, tmp_path, lock="both", max_steps=6)
    image_after, text_after = trunks(model)
    assert same(image_before, image_after) and same(text_before, text_after)  # byte-identical trunks
    assert not same(heads_before[0], snapshot(model.image.proj))
    assert not same(heads_before[1], snapshot(model.text.proj))
    # the features the heads trained on are the trunk's, on each image's eval view
    from distill.io import load_tensors

    feats = load_tensors(tmp_path / "tune" / "features" / "frozen.safetensors")
    rows = load_rows(str(shapes / "train.csv"))
    first = int(feats["image_rows"][0])
    pixels = eval_transform(model.preprocess)(Image.open(rows.images[0]).convert("RGB"))
    with torch.no_grad():
        assert torch.allclose(feats["image"][first], model.image.trunk.eval()(pixels[None])[0], atol=1e-5)
    # a second run over the same model and data reads them back instead of running the towers
    monkeypatch.setattr(Tuner, "_image_table", lambda *a: pytest.fail("image features computed twice"))
    again = tune(two_tower(), shapes, tmp_path, lock="both", max_steps=6, overwrite=True)
    assert again.history["loss"] == result.history["loss"]


def test_unfreeze_last_trains_only_the_last_blocks(shapes, tmp_path):
    model = two_tower()
    image_before, text_before = trunks(model)
    tune(model, shapes, tmp_path, lock="both", unfreeze_last=1)
    image_after, text_after = trunks(model)
    moved = {k for k in image_before if not torch.equal(image_before[k], image_after[k])}
    assert moved and all(k.startswith(("blocks.0.", "norm.")) for k in moved)  # TINY_VIT: one block + final norm
    assert torch.equal(image_before["patch_embed.proj.weight"], image_after["patch_embed.proj.weight"])
    moved = {k for k in text_before if not torch.equal(text_before[k], text_after[k])}
    assert moved and all(k.startswith("encoder.layer.0.") for k in moved)  # the embeddings stay as they were


def test_unfreeze_last_needs_locked_towers_with_that_many_blocks(shapes, tmp_path):
    from distill import Tuner

    with pytest.raises(ValueError, match="tune.unfreeze_last: 2 needs locked towers"):
        Tuner(two_tower(), lock="none", unfreeze_last=2)
    with pytest.raises(ValueError, match="tune.unfreeze_last: 5, but vit_tiny has 1 blocks"):
        tune(two_tower(), shapes, tmp_path, lock="image", unfreeze_last=5)


def test_tuning_takes_the_token_schedule(shapes, tmp_path, monkeypatch):
    """``distill tune`` feeds the towers it trains fewer tokens in the schedule's first stage (issue 18)."""
    import distill.tokens as tk

    seen = []
    real_img, real_txt = tk.image_features, tk.text_features
    monkeypatch.setattr(tk, "image_features", lambda m, x, cfg, g=None: seen.append(("image", cfg.mode if cfg else ""))
                        or real_img(m, x, cfg, g))
    monkeypatch.setattr(tk, "text_features", lambda m, t, cfg, g=None, p=None: seen.append(("text", cfg.mode if cfg else ""))
                        or real_txt(m, t, cfg, g, p))
    sched = [{"steps": 2, "image_tokens": {"mode": "grid"}, "text_tokens": {"mode": "truncate", "keep": 3}}, {"steps": 1}]
    result = tune(two_tower(), shapes, tmp_path, lock="none", schedule=sched)
    assert result.steps == 3
    assert seen == [("image", "grid"), ("text", "truncate")] * 2 + [("image", ""), ("text", "")]
