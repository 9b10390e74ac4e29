"""Fewer tokens (CLIPA): the masks, the forward they change, and two-stage runs."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_student
from distill import Distiller, create_student
from distill.config import TokensCfg, load_recipe
from distill.errors import RecipeError
from distill.tokens import (TAGGERS, get_tagger, image_features, patch_indices, select_tokens, stage_at,
                            syntax_priority, text_features)

FAST = dict(batch_size=16, num_workers=0, progress=False, warmup_steps=2, lr=3e-3)


# -- image masks -------------------------------------------------------------------------------------
def test_random_keeps_the_fraction_in_order():
    g = torch.Generator().manual_seed(0)
    idx = patch_indices("random", (4, 4), 0.5, 6, g)
    assert idx.shape == (6, 8)
    assert all(len(set(r.tolist())) == 8 for r in idx)  # no patch twice
    assert torch.equal(idx, idx.sort(dim=1).values)  # order kept
    assert not all(torch.equal(idx[0], r) for r in idx[1:])  # each image its own mask


def test_grid_keeps_one_patch_of_every_2x2_window():
    idx = patch_indices("grid", (6, 6), 0.25, 5, torch.Generator().manual_seed(1))
    assert idx.shape == (5, 9)
    for row in idx.tolist():
        windows = [(i // 6 // 2, i % 6 // 2) for i in row]
        assert sorted(windows) == [(a, b) for a in range(3) for b in range(3)]  # each window exactly once


def test_grid_on_an_odd_grid_keeps_whole_windows_only():
    idx = patch_indices("grid", (5, 5), 0.25, 8, torch.Generator().manual_seed(3))
    assert idx.shape == (8, 4)
    for row in idx.tolist():
        assert sorted((i // 5 // 2, i % 5 // 2) for i in row) == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_block_is_one_contiguous_rectangle():
    idx = patch_indices("block", (8, 8), 0.25, 5, torch.Generator().manual_seed(2))
    assert idx.shape == (5, 16)
    for row in idx.tolist():
        r, c = [i // 8 for i in row], [i % 8 for i in row]
        assert (max(r) - min(r) + 1) * (max(c) - min(c) + 1) == 16  # a full 4x4 rectangle
        assert len(set(row)) == 16


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("mode,keep", [("random", 0.5), ("grid", 0.25), ("block", 0.5)])
def test_masked_forward_differs_and_costs_fewer_flops(mode, keep):
    torch.manual_seed(0)
    student = tiny_student().train()  # 32 px, 8 px patches: 16 patches + the class token
    x = torch.randn(4, 3, 32, 32)
    cfg = TokensCfg(mode=mode, keep=keep)
    full = student.image_features(x)
    masked = image_features(student, x, cfg, torch.Generator().manual_seed(0))
    assert masked.shape == full.shape and not torch.allclose(masked, full)
    f_full = _flops(lambda: student.image_features(x))
    f_masked = _flops(lambda: image_features(student, x, cfg, torch.Generator().manual_seed(0)))
    assert f_masked < 0.75 * f_full
    # the class token is kept: the mask replaces only the patch tokens, and the model is whole afterwards
    assert torch.equal(student.image_features(x), full)


def test_resize_trains_a_vit_at_half_size_and_back_without_rebuilding():
    torch.manual_seed(0)
    student = tiny_student()
    x = torch.randn(2, 3, 32, 32)
    before = student.image_features(x)
    cfg = TokensCfg(mode="resize", keep=0.25)  # a quarter of the tokens: 16 px, 2x2 patches
    small = image_features(student, x, cfg)
    assert small.shape == before.shape and not torch.allclose(small, before)
    assert _flops(lambda: image_features(student, x, cfg)) < 0.5 * _flops(lambda: student.image_features(x))
    assert torch.equal(student.image_features(x), before)  # full size again, same model
    with pytest.raises(Exception):
        student.image_features(torch.randn(1, 3, 16, 16))  # outside a resize stage the size is checked as before


def test_cnn_students_support_resize_only():
    torch.manual_seed(0)
    cnn = create_student("resnet18", embed_dim=16, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert image_features(cnn, x, TokensCfg(mode="resize", size=16)).shape == (2, 16)
    with pytest.raises(RecipeError, match="resize only"):
        image_features(cnn, x, TokensCfg(mode="random", keep=0.5))


# -- text masks --------------------------------------------------------------------------------------
CLS, SEP, PAD = 101, 102, 0


def _tokens():
    ids = torch.tensor([[CLS, 11, 12, 13, 14, 15, 16, SEP], [CLS, 21, 22, SEP, PAD, PAD, PAD, PAD]])
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


@pytest.mark.parametrize("mode", ["truncate", "random", "block"])
def test_text_masks_keep_count_order_and_special_tokens(mode):
    out = select_tokens(_tokens(), [CLS, SEP, PAD], mode, 3, torch.Generator().manual_seed(0))
    first = out["input_ids"][0].tolist()
    assert first[0] == CLS and first[-1] == SEP and len(first) == 5  # 3 content tokens + 2 special
    content = first[1:-1]
    assert content == sorted(content) and set(content) <= {11, 12, 13, 14, 15, 16}
    if mode == "truncate":
        assert content == [11, 12, 13]
    if mode == "block":
        assert content[-1] - content[0] == 2  # contiguous
    # a caption shorter than keep stays whole, padded to the batch's length
    assert out["input_ids"][1].tolist() == [CLS, 21, 22, SEP, PAD]
    assert out["attention_mask"].tolist() == [[1] * 5, [1, 1, 1, 1, 0]]


def test_syntax_keeps_nouns_then_adjectives_in_order():
    # a tagged sentence: "a small dog runs on green grass"
    priority = torch.tensor([[3, 3, 1, 0, 2, 3, 1, 0, 3]])  # CLS a small dog runs on green grass SEP
    ids = torch.tensor([[CLS, 1, 2, 3, 4, 5, 6, 7, SEP]])
    toks = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    assert select_tokens(toks, [CLS, SEP], "syntax", 2, priority=priority)["input_ids"].tolist() == \
        [[CLS, 3, 7, SEP]]  # the two nouns
    assert select_tokens(toks, [CLS, SEP], "syntax", 3, priority=priority)["input_ids"].tolist() == \
        [[CLS, 2, 3, 7, SEP]]  # + the first adjective, in sentence order
    assert select_tokens(toks, [CLS, SEP], "syntax", 5, priority=priority)["input_ids"].tolist() == \
        [[CLS, 2, 3, 4, 6, 7, SEP]]  # nouns, adjectives, then the verb


def _bert(**kw):
    torch.manual_seed(0)
    return create_student("bert_small", embed_dim=16, hidden_size=32, num_layers=1, num_heads=2, **kw)


@pytest.fixture
def lexicon_tagger():
    words = {"dog": "NN", "grass": "NN", "dogs": "NNS", "small": "JJ", "green": "JJ", "runs": "VBZ", "play": "VBP"}
    name = "test_lexicon"
    if name not in TAGGERS:
        TAGGERS.register(lambda: (lambda ws: [words.get(w.lower(), "DT") for w in ws]), name=name)
    return name


def test_syntax_priority_maps_tagged_words_to_the_students_tokens(lexicon_tagger):
    student = _bert()
    texts = ["a small dog runs on green grass", "dogs play"]
    toks = student.tokenize(texts)
    prio = syntax_priority(student.text.tokenizer, texts, toks, get_tagger(lexicon_tagger))
    kept = select_tokens(toks, student.text.tokenizer.all_special_ids, "syntax", 2, priority=prio)
    words = [student.text.tokenizer.decode(r, skip_special_tokens=True) for r in kept["input_ids"]]
    assert words == ["dog grass", "dogs play"]


def test_textblob_tagger_tags_nouns_offline():
    pytest.importorskip("textblob")
    tags = get_tagger("textblob")(["a", "little", "girl", "climbs", "the", "wooden", "stairs"])
    assert [t[:2] for t in tags] == ["DT", "JJ", "NN", "VB", "DT", "JJ", "NN"]


def test_a_missing_tagger_says_what_to_install():
    with pytest.raises(RecipeError, match="text_tokens.tagger.*(install|download)"):
        get_tagger("spacy:no_such_pipeline_xx")
    with pytest.raises(RecipeError, match="text_tokens.tagger: 'nope'"):
        get_tagger("nope")


def test_masked_text_forward_differs_and_costs_fewer_flops():
    student = _bert().train()
    toks = student.tokenize(["a man rides a red bicycle down a long street next to the old harbour wall"])
    cfg = TokensCfg(mode="truncate", keep=4)
    full = text_features(student, toks, None)
    short = text_features(student, toks, cfg)
    assert not torch.allclose(full, short)
    assert _flops(lambda: text_features(student, toks, cfg)) < 0.5 * _flops(lambda: student.text_features(toks))


# -- recipes and runs --------------------------------------------------------------------------------
def test_schedule_in_a_recipe(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text("train:\n  schedule:\n    - {steps: 40, image_tokens: {mode: random, keep: 0.5}, "
                 "text_tokens: {mode: syntax, keep: 8, tagger: textblob}}\n    - {steps: 5}\n")
    r = load_recipe(f)
    assert r.train.max_steps == 45 and r.train.schedule[0].image_tokens.keep == 0.5
    assert r.train.schedule[0].text_tokens.tagger == "textblob" and r.train.schedule[1].image_tokens.mode == ""
    assert stage_at(r.train.schedule, 39)[0] == 0 and stage_at(r.train.schedule, 40)[0] == 1
    f.write_text("train:\n  schedule:\n    - {steps: 40, image_tokens: {mode: randm}}\n")
    with pytest.raises(RecipeError, match=r"train.schedule\[0\].image_tokens.mode: 'randm'"):
        load_recipe(f)
    f.write_text("train:\n  schedule:\n    - {steps: 40, text_tokens: {mode: syntax, keep: 0}}\n")
    with pytest.raises(RecipeError, match=r"train.schedule\[0\].text_tokens.keep"):
        load_recipe(f)
    f.write_text("train:\n  schedule:\n    - {steps: 40, image_tokens: {mode: random, kep: 0.5}}\n")
    with pytest.raises(RecipeError, match=r"train.schedule\[0\].image_tokens.kep: unknown key"):
        load_recipe(f)


SCHEDULE = [{"steps": 4, "image_tokens": {"mode": "random", "keep": 0.5}}, {"steps": 3}]


def _staged(teacher, shapes, out, **kw):
    torch.manual_seed(0)
    return Distiller(teacher, tiny_student(), output_dir=str(out), schedule=SCHEDULE, checkpoint_every=3,
                     log_every=1, **{**FAST, **kw}).fit(str(shapes / "train.csv"))


def test_two_stages_switch_at_the_step_and_resume_across_the_boundary(teacher, shapes, tmp_path, monkeypatch):
    import distill.tokens as tk

    seen = []
    real = tk.image_features
    monkeypatch.setattr(tk, "image_features", lambda m, x, cfg, g=None: seen.append(cfg.mode if cfg else "")
                        or real(m, x, cfg, g))
    full = _staged(teacher, shapes, tmp_path / "full")
    assert seen == ["random"] * 4 + [""] * 3 and full.steps == 7  # max_steps = the stages' sum
    stages = [json.loads(x)["stage"] for x in (tmp_path / "full" / "log.jsonl").read_text().splitlines()]
    assert stages == [1, 1, 1, 1, 2, 2, 2]
    # a crash after the step-3 checkpoint (inside stage 1): the resumed run crosses into stage 2 as the
    # uninterrupted one did, with the same masks
    import shutil

    _staged(teacher, shapes, tmp_path / "cut", keep_checkpoints=10)
    for later in ("checkpoints/step_00000006", "checkpoints/step_00000007", "student"):
        shutil.rmtree(tmp_path / "cut" / later)
    resumed = _staged(teacher, shapes, tmp_path / "cut", resume=True)
    assert resumed.history["loss"] == full.history["loss"]
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), k


def test_text_stage_with_syntax_runs_from_captions(teacher, shapes, tmp_path, lexicon_tagger):
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, hidden_size=32, num_layers=1, num_heads=2)
    sched = [{"steps": 12, "text_tokens": {"mode": "syntax", "keep": 3, "tagger": lexicon_tagger}}, {"steps": 8}]
    result = Distiller(teacher, student, output_dir=str(tmp_path / "txt"), schedule=sched, **FAST).fit(
        str(shapes / "train.csv"))
    loss = result.history["loss"]
    assert len(loss) == 20 and sum(loss[-4:]) < sum(loss[:4])
