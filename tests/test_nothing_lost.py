"""Nothing lost, nothing silently wrong (issue 32): each data loss, silent wrong result and unclear error the
probes found, as it was reported. Each test fails on the code before the fix."""
import csv
import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OPENCLIP, TINY_VIT, tiny_student
from distill import Distiller
from distill.errors import CacheError, DataError, FileFormatError, ModelError, RecipeError, RunConflictError

FAST = dict(batch_size=8, num_workers=0, progress=False, warmup_steps=1, lr=3e-3, health_every=0)
TOWERS = dict(image_kwargs={"image_size": 32, "model_kwargs": dict(TINY_VIT)},
              text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16})


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture
def two_tower(tmp_path):
    from distill import create_student

    torch.manual_seed(0)
    model = create_student("vit_tiny+bert_small", embed_dim=32, **TOWERS)
    return model, model.save(tmp_path / "student")


def _one_line_error(capsys, command: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert not any("Traceback" in line or "internal error" in line for line in err), err
    assert err and err[-1].startswith(f"distill {command}: error: "), err
    return err[-1]


# -- data loss --------------------------------------------------------------------------------------------------
def test_an_export_into_a_folder_holding_another_export_is_refused(two_tower, tmp_path, capsys):
    from distill.cli import main
    from distill import load_student

    _, folder = two_tower
    out = tmp_path / "exp" / "mixed"
    assert main(["export", str(folder), "--format", "sentence-transformers", "--out", str(out)]) == 0
    before = snapshot(out)
    assert main(["export", str(folder), "--format", "safetensors", "--out", str(out)]) == 2
    assert "already holds a sentence-transformers model" in _one_line_error(capsys, "export")
    assert snapshot(out) == before  # the first export is whole and still loads
    import sentence_transformers

    assert sentence_transformers.SentenceTransformer(str(out), device="cpu").encode(["a red circle"]).shape == (1, 32)
    # --overwrite replaces it whole: nothing of the first export is left to mix with the second
    assert main(["export", str(folder), "--format", "safetensors", "--out", str(out), "--overwrite"]) == 0
    assert not (out / "modules.json").exists() and not (out / "1_Pooling").exists()
    assert load_student(out).modality == "both"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left


def test_overwrite_never_deletes_the_teacher_the_run_reads(shapes, tmp_path):
    from distill import Tuner, create_student

    torch.manual_seed(0)
    tuned = Tuner(create_student("vit_tiny+bert_small", embed_dim=32, **TOWERS), output_dir=str(tmp_path / "tuned"),
                  max_steps=1, **FAST).fit(str(shapes / "train.csv"))
    teacher_dir = tuned.model_dir
    before = snapshot(teacher_dir)
    for overwrite in (False, True):
        with pytest.raises(RunConflictError, match=r"tuned/model is or holds the teacher .* a run writes its model"):
            Distiller(str(teacher_dir), tiny_student(), output_dir=str(tmp_path / "tuned"),
                      max_steps=1, overwrite=overwrite, **FAST).fit(str(shapes / "train.csv"))
    assert snapshot(teacher_dir) == before


def test_in_place_export_is_refused(two_tower, capsys):
    from distill.cli import main
    from distill import load_student

    _, folder = two_tower
    before = snapshot(folder)
    for extra in (["--towers", "image"], ["--dtype", "fp16"], ["--towers", "image", "--overwrite"]):
        assert main(["export", str(folder), "--out", str(folder), *extra]) == 2
        assert "is the student being exported" in _one_line_error(capsys, "export")
    assert snapshot(folder) == before
    again = load_student(folder)
    assert again.text is not None and next(again.parameters()).dtype == torch.float32


def test_resume_and_overwrite_together_are_refused(tmp_path):
    from distill.config import load_recipe

    with pytest.raises(RecipeError, match="^train.overwrite: true deletes the checkpoints that train.resume"):
        load_recipe(None, ["train.resume=true", "train.overwrite=true"])
    with pytest.raises(RecipeError, match="^train.overwrite"):
        Distiller(None, None, resume=True, overwrite=True)


# -- silent wrong results ---------------------------------------------------------------------------------------
def test_parallel_data_trains_only_language_columns(tmp_path):
    from distill.data import load_parallel

    path = tmp_path / "parallel.csv"
    rows = [("000000", "a dog runs on the grass", "ein Hund rennt auf dem Gras", "train", "http://x/1"),
            ("000001", "two men play football", "zwei Männer spielen Fußball", "train", "http://x/2"),
            ("000002", "a red car in the rain", "ein rotes Auto im Regen", "val", "http://x/3")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("id", "en", "de", "split", "url"), *rows])
    got = load_parallel(path, "en")
    assert set(got.captions) == {r[1] for r in rows} | {r[2] for r in rows}  # de, and en onto itself
    assert not any(c.isdigit() or "://" in c or c in ("train", "val") for c in got.captions)
    with pytest.raises(DataError, match=r"column 'id' \(data.parallel_targets\) holds numbers or codes"):
        load_parallel(path, "en", ["de", "id"])
    # an image-caption file read as parallel sentences: the image paths never become captions
    images = tmp_path / "pairs.csv"
    images.write_text("image,caption\nimages/0.jpg,a red square\nimages/1.jpg,a blue circle\n", encoding="utf-8")
    with pytest.raises(DataError, match="no column besides 'caption' is a language of sentences"):
        load_parallel(images, "caption")
    with pytest.raises(DataError, match=r"column 'image' \(data.parallel_targets\) holds file paths"):
        load_parallel(images, "caption", ["image"])


def test_eval_queries_match_photos_by_content(teacher, shapes, tmp_path):
    from distill.data import load_rows
    from distill.eval import cross_lingual

    gallery = load_rows(str(shapes / "test.csv"))
    copy = tmp_path / "copy"
    shutil.copytree(shapes / "images", copy)  # the same photos, in another folder
    q_rows = [(str(copy / Path(p).name), f"query {c}") for p, c in zip(gallery.images, gallery.captions)]
    with open(tmp_path / "queries.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *q_rows])
    original = tmp_path / "original.csv"
    original.write_text("image,caption\n" + "".join(f"{p},query {c}\n" for p, c in zip(gallery.images,
                                                                                        gallery.captions)))
    student = tiny_student()
    got = cross_lingual(teacher, student, load_rows(str(tmp_path / "queries.csv")), gallery, True, False)
    want = cross_lingual(teacher, student, load_rows(str(original)), gallery, True, False)
    assert got == want and got["teacher"]["queries_matched"] == len(gallery)
    assert got["teacher"]["t2i_r1"] > 0  # the copied photos are found, not scored 0
    other = tmp_path / "other.csv"
    Image.new("RGB", (40, 40), (1, 2, 3)).save(tmp_path / "lone.png")
    other.write_text(f"image,caption\n{tmp_path / 'lone.png'},a photo nobody else has\n")
    with pytest.raises(DataError, match="none of its 1 photos is among the photos of"):
        cross_lingual(teacher, student, load_rows(str(other)), gallery, True, False)


def test_a_vocabulary_grown_from_unigram_pieces_spells_every_word():
    from distill.students.text import hf_text_tower
    from distill.vocab import grow_vocab, train_tokenizer

    words = ("Một người đàn ông đang chạy trên bãi biển con chó màu đỏ xanh nhỏ lớn những đứa trẻ chơi bóng đá "
             "cô gái mặc áo khoác đi xe đạp trong công viên cạnh hồ nước ngồi ghế đường phố thành").split()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) for _ in range(1500)]
    share = {}
    for model in ("wordpiece", "unigram"):
        tower = hf_text_tower("minilm", 32)
        grown, added = grow_vocab(tower.encoder, tower.tokenizer, train_tokenizer(texts, 2000, model, lowercase=True))
        ids = grown(texts, add_special_tokens=False)["input_ids"]
        share[model] = sum(x.count(grown.unk_token_id) for x in ids) / sum(map(len, ids))
        assert all(not p.startswith("▁") for p in added)
    assert share["wordpiece"] == 0 and share["unigram"] == 0  # was 0.67 from Unigram pieces


def test_a_stage_amount_without_a_mode_is_refused():
    from distill.config import load_recipe

    for tower, amount in (("image_tokens", "keep: 0.25"), ("text_tokens", "keep: 8"), ("image_tokens", "size: 64")):
        with pytest.raises(RecipeError, match=rf"^train.schedule\[0\].{tower}.mode: .* no mode says how"):
            load_recipe(None, [f"train.schedule=[{{steps: 5, {tower}: {{{amount}}}}}, {{steps: 5}}]"])
    with pytest.raises(RecipeError, match=r"image_tokens.size: 64 is the side of a resize stage"):
        load_recipe(None, ["train.schedule=[{steps: 5, image_tokens: {mode: random, keep: 0.5, size: 64}}]"])


def test_an_image_edited_with_its_size_and_mtime_restored_gets_a_new_key(teacher, tmp_path):
    from distill.cache import EmbeddingCache, TeacherService, lookup
    from distill.data import load_rows

    (tmp_path / "img").mkdir()
    rows = []
    for k in range(10):  # BMP: an edited pixel keeps the file's size
        Image.fromarray(np.full((24, 24, 3), k * 20, np.uint8)).save(tmp_path / "img" / f"{k}.bmp")
        rows.append(f"img/{k}.bmp,shape {k}\n")
    (tmp_path / "pairs.csv").write_text("image,caption\n" + "".join(rows))
    TeacherService(teacher, tmp_path / "c", num_workers=0, progress=False).build(str(tmp_path / "pairs.csv"))
    victim = tmp_path / "img" / "3.bmp"
    st = victim.stat()
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 0xFF
    victim.write_bytes(bytes(raw))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    found = lookup(load_rows(str(tmp_path / "pairs.csv")), EmbeddingCache.open(tmp_path / "c"), progress=False)
    assert found.missing == [3]  # its old embedding is not served for its new content


# -- unclear errors ---------------------------------------------------------------------------------------------
@pytest.fixture
def text_teacher(tmp_path):
    from distill import create_student, load_teacher

    torch.manual_seed(0)
    text = create_student("bert_small", embed_dim=32, **TOWERS["text_kwargs"])
    return load_teacher(str(text.save(tmp_path / "text_teacher")))


def test_a_text_student_from_a_cache_of_a_text_teacher_on_image_data_trains(text_teacher, shapes, tmp_path):
    from distill import create_student

    student = create_student("bert_small", embed_dim=32, **TOWERS["text_kwargs"])
    result = Distiller(text_teacher, student, cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
                       max_steps=2, **FAST).fit(str(shapes / "train.csv"))
    assert len(result.history["loss"]) == 2  # was "rows are still missing after the build"


def test_a_cache_row_with_a_flipped_exponent_is_named(teacher, shapes, tmp_path):
    from distill.cache import EmbeddingCache, TeacherService

    data = str(shapes / "train.csv")
    TeacherService(teacher, tmp_path / "c", dtype="fp32", num_workers=0, progress=False).build(data)
    shard = tmp_path / "c" / "texts" / "shard_00000.npy"
    a = np.load(shard)
    bits = a.view(np.uint32)
    bits[5, 0] ^= 1 << 30  # the top exponent bit: still finite, and far from a unit vector
    assert np.isfinite(a).all() and abs(np.linalg.norm(a[5]) - 1) > 0.1
    np.save(shard, a)
    with pytest.raises(CacheError, match=r"texts/shard_00000.npy: row 5 .* not a unit vector"):
        Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(data)
    cache = EmbeddingCache.open(tmp_path / "c", check_values=False)  # a reader that skipped the scan still stops
    key = next(k for k, (s, r) in cache.text_index.items() if r == 5)
    with pytest.raises(CacheError, match="row 5 .* not a unit vector"):
        cache.text_embeddings([key])


def test_a_patch_mask_stage_after_a_resize_stage_on_a_cnn_is_refused_before_step_one(teacher, shapes, tmp_path):
    from distill import create_student

    student = create_student("resnet18", embed_dim=32, image_size=32)
    schedule = [{"steps": 2, "image_tokens": {"mode": "resize", "size": 16}},
                {"steps": 2, "image_tokens": {"mode": "random", "keep": 0.5}}]
    with pytest.raises(RecipeError, match=r"^train.schedule\[1\].image_tokens.mode: random drops patch tokens"):
        Distiller(teacher, student, output_dir=str(tmp_path / "r"), schedule=schedule, **FAST).fit(
            str(shapes / "train.csv"))
    assert not (tmp_path / "r" / "log.jsonl").exists()  # no step was run


def test_captions_onto_images_with_a_text_only_teacher_name_the_key(text_teacher, shapes, tmp_path):
    from distill import create_student

    student = create_student("bert_small", embed_dim=32, **TOWERS["text_kwargs"])
    with pytest.raises(RecipeError, match="^data.text_target: image learns captions onto the teacher's image "
                                          "embeddings, and the teacher .* has no image tower"):
        Distiller(text_teacher, student, text_target="image", output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))
    with pytest.raises(RecipeError, match="^student.name: the student has an image tower and the teacher"):
        Distiller(text_teacher, tiny_student(), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo unpickled",))


def test_a_malicious_weights_file_is_refused_in_one_line(shapes, tmp_path, capsys):
    import pickle

    from distill import load_teacher
    from distill.cli import main

    evil = tmp_path / "evil.bin"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(FileFormatError, match="evil.bin: not weights of open_clip's tiny-evil .* never unpickled"):
        load_teacher("openclip:tiny-evil", pretrained=str(evil), model_cfg=TINY_OPENCLIP)
    assert main(["cache", "build", "--teacher", "openclip:ViT-B-32", "--pretrained", str(evil), "--data",
                 str(shapes / "train.csv"), "--out", str(tmp_path / "c")]) == 2
    assert "never unpickled" in _one_line_error(capsys, "cache")
    assert "unpickled" not in capsys.readouterr().out


def test_an_unreachable_hub_names_the_model_and_the_key(monkeypatch):
    import timm
    from huggingface_hub.errors import LocalEntryNotFoundError

    from distill import create_student

    def offline(*args, **kwargs):
        if kwargs.get("pretrained"):
            raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub")
        return real(*args, **kwargs)

    real = timm.create_model
    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(ModelError, match="^student.kwargs.pretrained: timm's pretrained weights of "
                                         "vit_tiny_patch16_224 cannot be loaded .* give a local weights file"):
        create_student("vit_tiny", embed_dim=8, pretrained=True)


def test_debug_keeps_the_one_line_message_and_exit_2(tmp_path, capsys):
    from distill.cli import main

    assert main(["--debug", "export", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("distill export: error: ")


def test_cache_verify_blames_an_edited_manifest_not_the_intact_shard(teacher, shapes, tmp_path):
    from distill.cache import EmbeddingCache, TeacherService

    TeacherService(teacher, tmp_path / "c", num_workers=0, progress=False).build(str(shapes / "train.csv"))
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["shards"]["images"][0]["sha256"]["emb"] = "0" * 64
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    problems = EmbeddingCache.open(tmp_path / "c").verify()
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'c' / 'manifest.json'}: the checksum")
    assert "the shard's own record, which the file matches" in problems[0]


def test_a_huge_vocabulary_is_refused_not_aborted(shapes, tmp_path):
    from distill.cli import main
    from distill.vocab import train_tokenizer

    with pytest.raises(SystemExit) as stop:  # argparse: exit 2 with the bound named
        main(["tokenizer", "train", str(shapes / "train.csv"), "--out", str(tmp_path / "t"), "--vocab", "5000000000"])
    assert stop.value.code == 2
    with pytest.raises(RecipeError, match="--vocab: 5000000000 is over"):
        train_tokenizer(["a red circle"], 5_000_000_000)
