"""The fault suite (issue 14): hostile but realistic inputs. Each test names the item it covers; each
asserts that the message names the file/line, row or key, or that nothing was substituted."""
import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_OPENCLIP, TINY_VIT, tiny_student
from distill import Distiller
from distill.errors import CacheError, CacheMismatchError, CacheMissError, DataError, RecipeError, RunConflictError

FAST = dict(batch_size=8, num_workers=0, progress=False, warmup_steps=1, lr=3e-3, health_every=0)


def _photos(folder: Path, n: int, size: int = 32, seed: int = 0) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(folder / f"{k:04d}.jpg")
        names.append(f"{k:04d}.jpg")
    return names


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distill.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


# -- 1. real-world caption files ---------------------------------------------------------------------

def test_1_caption_files_in_real_world_layouts(tmp_path):
    from distill.data import load_rows

    names = _photos(tmp_path / "images", 4)
    # a header CSV whose captions hold unquoted commas (the caption is the last column)
    (tmp_path / "commas.csv").write_text("image,caption\n" + "".join(
        f"images/{n},a dog, a cat, and a bird {i}\n" for i, n in enumerate(names)), encoding="utf-8")
    rows = load_rows(tmp_path / "commas.csv")
    assert rows.captions[1] == "a dog, a cat, and a bird 1" and os.path.exists(rows.images[1])
    # headerless `name, caption` lines in a .txt, images in images/ beside it (Kaggle / Flickr style)
    (tmp_path / "captions.txt").write_text("".join(f"{n}, a photo number {i}, outdoors\n" for i, n in enumerate(names)))
    rows = load_rows(tmp_path / "captions.txt")
    assert rows.captions == [f"a photo number {i}, outdoors" for i in range(4)]
    assert [Path(p).name for p in rows.images] == names and all(os.path.exists(p) for p in rows.images)
    assert "headerless" in rows.layout and "images/" in rows.layout
    # the same with a header line: the header is not a caption
    (tmp_path / "with_header.txt").write_text("image,caption\n" + "".join(f"{n},photo {i}\n" for i, n in enumerate(names)))
    rows = load_rows(tmp_path / "with_header.txt")
    assert rows.captions == [f"photo {i}" for i in range(4)] and all(os.path.exists(p) for p in rows.images)
    # Flickr8k's token file: `name.jpg#0<TAB>caption`
    (tmp_path / "tokens.txt").write_text("".join(f"{n}#{i % 2}\tA child playing {i} .\n" for i, n in enumerate(names)))
    rows = load_rows(tmp_path / "tokens.txt")
    assert rows.captions[3] == "A child playing 3 ." and Path(rows.images[3]).name == names[3]
    # a line that breaks the layout stops, naming the file and the line
    (tmp_path / "mixed.txt").write_text(f"{names[0]}, a photo\njust a sentence\n")
    with pytest.raises(DataError, match=r"mixed\.txt:2: .*accepted layouts"):
        load_rows(tmp_path / "mixed.txt")
    # more fields than the header, when the caption is not the last column: named, never a crash
    (tmp_path / "ragged.csv").write_text(f"caption,image\nhello, world,{names[0]}\n")
    with pytest.raises(DataError, match=r"ragged\.csv:2: 3 fields but the header has 2"):
        load_rows(tmp_path / "ragged.csv")
    # `distill data check` says which layout it read
    out = _cli("data", "check", str(tmp_path / "captions.txt"), "--out", str(tmp_path / "checked"), "--workers", "1")
    assert out.returncode == 0 and "layout: headerless" in out.stdout
    assert "headerless" in json.loads((tmp_path / "checked" / "report.json").read_text())["layout"]


# -- 2. relative paths through data check --------------------------------------------------------------

def test_2_data_check_output_resolves_from_anywhere(tmp_path):
    from distill.check import check_data
    from distill.data import load_rows

    data = tmp_path / "data"
    names = _photos(data / "img", 3)
    (data / "pairs.csv").write_text("image,caption\n" + "".join(f"img/{n},caption {n}\n" for n in names))
    cwd = os.getcwd()
    try:
        os.chdir(data)  # relative everything, as a user types it
        check_data("pairs.csv", "checked", workers=1, progress=False)
        os.chdir(tmp_path)  # and trains from elsewhere
        rows = load_rows(data / "checked" / "clean.jsonl")
    finally:
        os.chdir(cwd)
    assert len(rows) == 3 and all(os.path.exists(p) for p in rows.images)
    assert sorted(Path(p).name for p in rows.images) == names


# -- 3. a run never adopts other work ------------------------------------------------------------------

def test_3a_output_dir_of_another_run_is_refused(teacher, shapes, tmp_path):
    data = str(shapes / "train.csv")
    run = tmp_path / "run"
    Distiller(teacher, tiny_student(), output_dir=str(run), max_steps=4, checkpoint_every=2, **FAST).fit(data)
    before = {p.name: (p / "model.safetensors").read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(RunConflictError, match="optim.lr: 0.003 there vs 0.001 now"):
        Distiller(teacher, tiny_student(), output_dir=str(run), max_steps=6, checkpoint_every=2, resume=True,
                  **{**FAST, "lr": 1e-3}).fit(data)
    with pytest.raises(RunConflictError, match="train.resume=true .* train.overwrite=true"):
        Distiller(teacher, tiny_student(), output_dir=str(run), max_steps=2, **FAST).fit(data)
    after = {p.name: (p / "model.safetensors").read_bytes() for p in (run / "checkpoints").iterdir()}
    assert after == before  # nothing of the old run was pruned or replaced
    fresh = Distiller(teacher, tiny_student(), output_dir=str(run), max_steps=2, overwrite=True, **FAST).fit(data)
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000002"] and len(fresh.history["loss"]) == 2


def _service(teacher, path, **kw):
    from distill.cache import TeacherService

    return TeacherService(teacher, path, **{"shard_size": 64, "batch_size": 32, "num_workers": 0, "progress": False, **kw})


def _other_teacher(seed=99):
    from distill import load_teacher

    torch.manual_seed(seed)
    return load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)


def test_3b_a_cache_without_manifest_is_not_adopted(teacher, shapes, tmp_path):
    data = str(shapes / "train.csv")
    _service(teacher, tmp_path / "c").build(data, views=1)
    shards = {p: p.read_bytes() for p in (tmp_path / "c").rglob("shard_*")}
    (tmp_path / "c" / "manifest.json").unlink()
    with pytest.raises(CacheMismatchError, match=r"no manifest.json but holds .* built differently \(teacher\.weights: "):
        _service(_other_teacher(), tmp_path / "c").build(data, views=1)
    with pytest.raises(CacheMismatchError, match=r"built differently \(view_policy\.views: 1 in the cache vs 2 now"):
        _service(teacher, tmp_path / "c").build(data, views=2)  # another view count over the old shards
    assert {p: p.read_bytes() for p in (tmp_path / "c").rglob("shard_*")} == shards


def test_3c_cache_of_another_teacher_is_refused_before_loading(teacher, shapes, tmp_path, monkeypatch):
    from distill import create_student

    data = str(shapes / "train.csv")
    _service(teacher, tmp_path / "c").build(data, views=1)
    other = create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": TINY_VIT},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    other.save(tmp_path / "other_teacher")

    def no_loading(*a, **k):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr("distill.teachers.load_teacher", no_loading)
    with pytest.raises(CacheMismatchError, match=r"teacher\.backend: 'openclip' in the cache vs 'folder'"):
        Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  recipe=_recipe(teacher=str(tmp_path / "other_teacher")), **FAST).fit(data)


def _recipe(teacher: str):
    from distill.config import load_recipe

    return load_recipe(None, [f"teacher.name={teacher}"])


def test_3d_cache_only_training_never_loads_an_unnamed_teacher(teacher, shapes, tmp_path, monkeypatch):
    lines = (shapes / "train.csv").read_text().splitlines()
    (tmp_path / "first.csv").write_text("\n".join(lines[:81]).replace("images/", f"{shapes}/images/") + "\n")
    _service(teacher, tmp_path / "c").build(str(tmp_path / "first.csv"), views=1)

    def no_loading(*a, **k):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr("distill.teachers.load_teacher", no_loading)
    with pytest.raises(CacheMissError) as err:
        Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))
    msg = str(err.value)
    assert msg.startswith("80 of 160 rows have no teacher embedding") and "train.csv:" in msg and "train_" in msg


# -- 4. reproducibility -------------------------------------------------------------------------------

_RUN = """
import sys
sys.path.insert(0, {tests!r})
import torch
from conftest import TINY_OPENCLIP
from distill import Distiller, load_teacher
from distill.config import load_recipe
torch.manual_seed(0)
t = load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)
torch.manual_seed({noise})  # the global RNG state must not matter: train.seed decides
r = load_recipe(None, ["student.kwargs={{image_size: 32, model_kwargs: {{patch_size: 8, embed_dim: 32, depth: 1, num_heads: 2}}}}"])
res = Distiller(t, recipe=r, output_dir={out!r}, max_steps=3, seed=7, batch_size=8, num_workers=0, progress=False,
                health_every=0).fit({data!r})
print(repr(res.history["loss"][0]))
"""


def test_4a_same_recipe_and_seed_give_the_same_weights_across_processes(shapes, tmp_path):
    outs, first = [], []
    for k in range(2):
        script = _RUN.format(tests=str(Path(__file__).parent), noise=k, out=str(tmp_path / f"run{k}"),
                             data=str(shapes / "train.csv"))
        p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
        first.append(p.stdout.strip().splitlines()[-1])
        outs.append((tmp_path / f"run{k}" / "student" / "model.safetensors").read_bytes())
    assert first[0] == first[1]  # the step-1 loss: the student's initialisation comes from train.seed
    assert outs[0] == outs[1]


def test_4b_resume_restores_queue_and_does_not_repeat_log_lines(teacher, shapes, tmp_path, monkeypatch):
    from distill.cache import TeacherService
    from distill.loop import TrainLoop

    data = str(shapes / "train.csv")
    TeacherService(teacher, tmp_path / "c", dtype="fp32", num_workers=0, progress=False).build(data)
    opts = dict(cache=str(tmp_path / "c"), max_steps=8, checkpoint_every=3, log_every=1,
                loss_weights={"cosine": 1.0, "contrastive": 1.0}, loss_kwargs={"contrastive": {"queue": 24}}, **FAST)
    torch.manual_seed(0)
    full = Distiller(None, tiny_student(), output_dir=str(tmp_path / "full"), **opts).fit(data)

    original = TrainLoop._record

    def crash_after_step_5(self, history, step, *a, **k):
        original(self, history, step, *a, **k)
        if step == 5:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(TrainLoop, "_record", crash_after_step_5)
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        Distiller(None, tiny_student(), output_dir=str(tmp_path / "cut"), **opts).fit(data)
    monkeypatch.setattr(TrainLoop, "_record", original)
    torch.manual_seed(0)
    resumed = Distiller(None, tiny_student(), output_dir=str(tmp_path / "cut"), resume=True, **opts).fit(data)
    assert resumed.history["loss"] == full.history["loss"]  # the queue of negatives came back with the checkpoint
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_4c_grad_scaler_state_is_checkpointed(tmp_path):
    from distill.checkpoint import load_checkpoint, save_checkpoint

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()  # a real fp16-style step, then a new scale
    scaler.step(opt)
    scaler.update(new_scale=1234.0)
    save_checkpoint(tmp_path, 5, model, opt, {"consumed": 5}, scaler=scaler)
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(tmp_path / "step_00000005", model, opt, scaler=fresh)
    assert fresh.get_scale() == 1234.0


# -- 5. numbers in recipes and flags -------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("train.batch_size=-4", "train.batch_size"), ("train.batch_size=0", "train.batch_size"),
    ("train.grad_accum=0", "train.grad_accum"), ("train.max_steps=0", "train.max_steps"),
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=0", "optim.lr"), ("data.crop_scale=[0.9, 0.2]", "data.crop_scale"),
    ("cache.views=0", "cache.views"), ("loss.weights={cosine: -1}", "loss.weights"),
    ("loss.weights={cosnie: 1}", "loss.weights"), ("train.precision=fp8", "train.precision"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio"),
])
def test_5_numbers_are_checked_at_parse_time(override, key):
    from distill.config import load_recipe

    with pytest.raises(RecipeError, match=f"^{key.replace('.', '[.]')}: "):
        load_recipe(None, [override])


def test_5_flags_are_checked(tmp_path):
    from distill.plan import parse_size

    for bad in ("0GB", "-8GB", "8", "abc"):
        with pytest.raises(RecipeError, match="--vram"):
            parse_size(bad)
    assert parse_size("8GB") == 8 * 2**30
    out = _cli("cache", "build", "--teacher", "x", "--data", "y", "--out", str(tmp_path), "--views", "0")
    assert out.returncode == 2 and "argument --views: 0 must be >= 1" in out.stderr
    with pytest.raises(RecipeError, match="train.batch_size"):
        Distiller(None, None, batch_size=-4)


# -- 6. corrupt or unusual files name themselves -------------------------------------------------------

def test_6_malformed_recipe_and_non_utf8_data_name_their_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  batch_size: 8\n   lr: [1\n")
    out = _cli("fit", str(tmp_path / "bad.yaml"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith(f"distill fit: error: {tmp_path / 'bad.yaml'}:3:") and "not valid YAML" in out.stderr
    (tmp_path / "latin.csv").write_bytes("image,caption\na.jpg,ok\nb.jpg,caf\xe9 au lait\n".encode("latin-1"))
    out = _cli("data", "check", str(tmp_path / "latin.csv"))
    assert out.returncode == 2 and f"{tmp_path / 'latin.csv'}:3: not UTF-8 (byte 0xe9" in out.stderr


def test_6_damaged_cache_shards_name_themselves(teacher, shapes, tmp_path):
    from distill.cache import EmbeddingCache

    data = str(shapes / "train.csv")
    _service(teacher, tmp_path / "c").build(data, views=1)
    shard = tmp_path / "c" / "images" / "shard_00001.npy"
    good = shard.read_bytes()
    shard.write_bytes(good[:-300])  # truncated
    with pytest.raises(CacheError, match="shard_00001.npy: cannot be read"):
        EmbeddingCache.open(tmp_path / "c")
    shard.write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '<f2', 'fortran_order': Fal" + good[60:])  # header damaged
    with pytest.raises(CacheError, match="shard_00001.npy: cannot be read"):
        EmbeddingCache.open(tmp_path / "c")
    a = np.load(io.BytesIO(good))
    a[3, 0, 5] = np.nan
    buf = io.BytesIO()
    np.save(buf, a)
    shard.write_bytes(buf.getvalue())
    with pytest.raises(CacheError, match=r"shard_00001.npy: row 3 \(.*train_.*\.png\) holds NaN/inf"):
        Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(data)
    # one flipped low bit: still finite, still (nearly) unit-norm, but the checksum finds it
    raw = bytearray(good)
    raw[-7] ^= 0x01
    shard.write_bytes(bytes(raw))
    problems = EmbeddingCache.open(tmp_path / "c").verify()
    assert problems and "shard_00001.npy: checksum differs" in problems[0]


def test_6_unwritable_cache_dir_fails_before_encoding(teacher, shapes, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(type(teacher), "encode_image", lambda self, x: calls.append(1))
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(CacheError, match="a_file/cache: cannot write the cache there"):
        _service(teacher, tmp_path / "a_file" / "cache").build(str(shapes / "train.csv"))
    assert calls == []


def test_6_class_folders_without_images_say_so(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "classes" / c).mkdir(parents=True)
        (tmp_path / "classes" / c / "notes.txt").write_text("no pictures here")
    out = _cli("eval", "--student", str(tmp_path), "--teacher", "x", "--classes", str(tmp_path / "classes"))
    assert out.returncode == 2  # the student folder is checked first; the data error is the library's
    from distill.data import load_rows

    with pytest.raises(DataError, match=r"classes: no images .* subfolders \(cat, dog\) hold no images"):
        load_rows(tmp_path / "classes")


# -- 7. images and rows ------------------------------------------------------------------------------

def test_7_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    from distill.data import open_image

    grey = (np.full((32, 32), 0.25) * 65535).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert abs(np.asarray(open_image(str(tmp_path / "g16.png"))).mean() - 0.25 * 255) < 1.5


def test_7_training_skips_exactly_what_check_rejects(teacher, tmp_path, caplog):
    from distill.check import check_data

    names = _photos(tmp_path / "img", 20)
    Image.new("RGB", (1, 1)).save(tmp_path / "img" / "dot.png")
    Image.new("RGB", (12, 40)).save(tmp_path / "img" / "thin.png")
    (tmp_path / "img" / "empty.jpg").write_bytes(b"")
    rows = [(f"img/{n}", f"a photo {i}") for i, n in enumerate(names)]
    rows += [("img/dot.png", "a dot"), ("img/thin.png", "a thin strip"), ("img/empty.jpg", "nothing"),
             ("img/missing.jpg", "gone"), (f"img/{names[0]}", "")]
    with open(tmp_path / "pairs.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    report = check_data(str(tmp_path / "pairs.csv"), tmp_path / "checked", workers=1, progress=False)
    with caplog.at_level("WARNING"):
        Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "run"), max_steps=12,
                  **{**FAST, "batch_size": 4}).fit(str(tmp_path / "pairs.csv"))  # several epochs over bad rows
    skipped = [json.loads(x) for x in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["where"] for s in skipped) == sorted(r["where"] for r in report.rejected)
    assert sorted(s["reason"] for s in skipped) == sorted(r["reason"] for r in report.rejected)
    assert len([r for r in caplog.records if r.getMessage().startswith("skipping ")]) == 5  # once per row
    assert "5 rows skipped" in caplog.text


def test_7_over_long_captions_count_tokens_and_characters():
    from distill.check import _token_counter, long_caption

    count = _token_counter()
    assert long_caption("一只猫坐在窗台上看着外面的雨" * 8, count).startswith("over-long caption (")  # no spaces
    assert "characters" in long_caption("x" * 400)  # without a tokenizer, characters still count
    assert long_caption("a short caption", count) is None


# -- 8. core correctness -----------------------------------------------------------------------------

def test_8_one_contrastive_implementation_treats_repeats_as_positives():
    import torch.nn.functional as F

    from distill.losses import ContrastiveLoss, Embeddings, clip_loss
    from distill.tune import caption_ids

    torch.manual_seed(0)
    txt = F.normalize(torch.randn(3, 16), dim=-1)
    captions = ["a cat", "a dog", "a cat", "a bird", "a dog", "a cat"]
    order = [0, 1, 0, 2, 1, 0]
    img = torch.randn(6, 16)
    loss = ContrastiveLoss(init_temperature=0.1)
    got = loss(Embeddings(s_img=img, t_txt=txt[order]))
    want = clip_loss(img, txt[order], loss.logit_scale, caption_ids(captions))
    torch.testing.assert_close(got, want)


def test_8_flips_are_off_by_default_and_cache_views_follow_the_recipe(teacher, shapes, tmp_path):
    from distill.cache import EmbeddingCache
    from distill.config import Recipe
    from distill.data import PairDataset, load_rows

    assert Recipe().data.flip is False
    ds = PairDataset(load_rows(shapes / "train.csv"), {"s": teacher.preprocess})
    assert not any(ds.view_for(i, 0, 40, 30).flip for i in range(200))
    assert any(PairDataset(ds.rows, ds.views, flip=True).view_for(i, 0, 40, 30).flip for i in range(200))
    # a cache the run builds itself stores the recipe's crops, not a hard-coded scale
    Distiller(teacher, tiny_student(), cache=str(tmp_path / "c"), cache_views=3, crop_scale=(0.9, 1.0),
              output_dir=str(tmp_path / "r"), max_steps=1, **FAST).fit(str(shapes / "train.csv"))
    cache = EmbeddingCache.open(tmp_path / "c")
    areas = np.concatenate([v[:, 1:, 2] * v[:, 1:, 3] for v in cache._views])
    flips = np.concatenate([v[:, :, 4] for v in cache._views])
    assert areas.min() >= 0.9 - 1e-6 and flips.max() == 0
    with pytest.raises(CacheMismatchError, match=r"data\.crop_scale: \[0\.5, 1\.0\] in the recipe vs \[0\.9, 1\.0\]"):
        Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r2"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))


def test_8_auto_precision_is_fp16_on_gpus_that_emulate_bf16(monkeypatch):
    from distill.plan import probe  # noqa: F401  (plan resolves precision through the same function)
    from distill.precision import resolve_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # what a T4 reports
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert resolve_precision("auto") == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert resolve_precision("auto") == "bf16"
    assert resolve_precision("auto", cpu=True) == "no" and resolve_precision("fp16") == "fp16"


def test_8_sentence_transformers_6_pooling_folders_load(tmp_path):
    import transformers

    from distill import load_teacher
    from distill.students.base import pool

    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64)
    torch.manual_seed(0)
    transformers.BertModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path)
    from distill.students.text import bert_tokenizer

    bert_tokenizer().save_pretrained(str(tmp_path))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "max"}))
    t = load_teacher(f"text:{tmp_path}")
    assert t.pooling == "max"
    tok = t.tokenize(["a red circle", "two blue squares on the left"])
    with torch.no_grad():
        hidden = t.encoder(**tok).last_hidden_state
    torch.testing.assert_close(t.encode_text(["a red circle", "two blue squares on the left"]),
                               F_normalize(pool(hidden, tok["attention_mask"], "max")))
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "lasttoken"}))
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling \['lasttoken'\] is not supported"):
        load_teacher(f"text:{tmp_path}")


def F_normalize(x):
    return torch.nn.functional.normalize(x.float(), dim=-1)
