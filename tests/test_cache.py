import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_OPENCLIP, tiny_student
from distill import Distiller
from distill.cache import CacheMismatchError, EmbeddingCache, TeacherService, image_keys, view_for
from distill.data import load_rows, open_image
from distill.transforms import PreprocessCfg, apply_view

FAST = dict(batch_size=16, num_workers=0, progress=False, warmup_steps=2, lr=3e-3)


def _service(teacher, path, **kw):
    return TeacherService(teacher, path, **{"shard_size": 32, "batch_size": 16, "num_workers": 0,
                                            "progress": False, **kw})


def _arrays(path):
    """Every stored array and the row ids, by file name."""
    out = {}
    for f in sorted(Path(path).rglob("shard_*")):
        out[f.relative_to(path).as_posix()] = np.load(f) if f.suffix == ".npy" else f.read_bytes()
    return out


def test_build_stores_replayable_views(teacher, shapes, tmp_path):
    s = _service(teacher, tmp_path / "c").build(str(shapes / "train.csv"), views=3)
    assert s.images_encoded == 160 and s.skipped == 0
    cache = EmbeddingCache.open(tmp_path / "c")
    assert cache.views == 3 and cache.manifest["counts"]["images"] == 160
    rows = load_rows(shapes / "train.csv")
    key = image_keys([rows.images[5]])[0][0]
    image = open_image(rows.images[5])
    for v in range(3):
        view = cache.view(key, v)
        # the stored parameters are the policy's, and replaying them reproduces the stored embedding
        expected = view_for(key, v, *image.size, cache.manifest["view_policy"])
        assert np.allclose(view.as_array(), expected.as_array())
        fresh = teacher.encode_image(apply_view(image, view, teacher.preprocess)[None])[0]
        assert float(fresh @ cache.image_embeddings([key], [v])[0]) > 0.999
    assert cache.view(key, 0).w == 1.0 and cache.view(key, 1).w < 1.0  # view 0 = eval transform
    assert cache.verify(teacher, sample=4, rows=rows) == []
    # reading a batch gathers memory-mapped rows
    assert isinstance(cache._images[0], np.memmap)


_KILLED_BUILD = """
import sys, time, torch
sys.path.insert(0, {tests!r})
from conftest import TINY_OPENCLIP
from distill import load_teacher
from distill.cache import TeacherService
torch.manual_seed(0)
t = load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)
def slow(kind, n):
    print(kind, n, flush=True)
    time.sleep(0.4)
TeacherService(t, {out!r}, shard_size=32, batch_size=16, num_workers=0, progress=False).build(
    {data!r}, views=2, on_shard=slow)
"""


def test_sigkill_then_resume_equals_uninterrupted_build(teacher, shapes, tmp_path):
    data = str(shapes / "train.csv")
    script = _KILLED_BUILD.format(tests=str(Path(__file__).parent), out=str(tmp_path / "killed"), data=data)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stdout:  # kill in the middle of the image shards
        seen.append(line)
        if len(seen) == 2:
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in (tmp_path / "killed" / "images").glob("shard_*.json"))
    assert 1 <= len(done) < 5  # 160 images in shards of 32: it stopped part-way
    with pytest.raises(ValueError, match="did not finish"):
        EmbeddingCache.open(tmp_path / "killed")
    resumed = _service(teacher, tmp_path / "killed").build(data, views=2)
    assert resumed.images_encoded == 160 - 32 * len(done)  # only what was missing
    clean = _service(teacher, tmp_path / "clean").build(data, views=2)
    assert clean.images_encoded == 160
    a, b = _arrays(tmp_path / "killed"), _arrays(tmp_path / "clean")
    assert a.keys() == b.keys()
    for name in a:
        if isinstance(a[name], np.ndarray):
            assert a[name].tobytes() == b[name].tobytes(), name
        else:
            assert a[name] == b[name], name
    ma, mb = EmbeddingCache.open(tmp_path / "killed").manifest, EmbeddingCache.open(tmp_path / "clean").manifest
    assert ma["fingerprint"] == mb["fingerprint"] and ma["counts"] == mb["counts"]


def test_incremental_build_encodes_only_new_rows(teacher, shapes, tmp_path):
    lines = (shapes / "train.csv").read_text().splitlines()
    (shapes / "first.csv").write_text("\n".join(lines[:101]) + "\n")  # header + 100 rows
    svc = _service(teacher, tmp_path / "c", dtype="fp32")
    first = svc.build(str(shapes / "first.csv"), views=2)
    assert first.images_encoded == 100
    second = svc.build(str(shapes / "train.csv"), views=2)
    assert second.images_encoded == 60 and second.images_cached == 160
    old, new = load_rows(shapes / "first.csv").captions, load_rows(shapes / "train.csv").captions
    assert second.texts_encoded == len(set(new) - set(old)) > 0
    fresh = _service(teacher, tmp_path / "fresh", dtype="fp32").build(str(shapes / "train.csv"), views=2)
    assert fresh.images_cached == 160
    inc, ref = EmbeddingCache.open(tmp_path / "c"), EmbeddingCache.open(tmp_path / "fresh")
    keys = sorted(ref.image_index)
    assert sorted(inc.image_index) == keys
    torch.testing.assert_close(inc.image_embeddings(keys, [1] * len(keys)), ref.image_embeddings(keys, [1] * len(keys)),
                               atol=1e-5, rtol=1e-4)
    assert inc.manifest["fingerprint"] == ref.manifest["fingerprint"]


def test_fingerprint_mismatch_names_the_field(teacher, shapes, tmp_path):
    _service(teacher, tmp_path / "c").build(str(shapes / "train.csv"))
    torch.manual_seed(99)
    from distill import load_teacher

    other = load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)
    with pytest.raises(CacheMismatchError, match=r"teacher\.weights: .* in the cache vs .* now"):
        Distiller(other, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))
    p = teacher.preprocess
    teacher.preprocess = PreprocessCfg(p.image_size, (0.5, 0.5, 0.5), p.std, p.interpolation, p.resize_mode)
    with pytest.raises(CacheMismatchError, match=r"preprocess\.mean"):
        Distiller(teacher, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "r"), max_steps=1,
                  **FAST).fit(str(shapes / "train.csv"))
    result = Distiller(other, tiny_student(), cache=str(tmp_path / "c"), allow_stale=True,
                       output_dir=str(tmp_path / "r"), max_steps=2, **FAST).fit(str(shapes / "train.csv"))
    assert len(result.history["loss"]) == 2


def test_broken_inputs_are_skipped_and_reported(teacher, shapes, tmp_path):
    import json

    from PIL import Image

    d = tmp_path / "broken"
    d.mkdir()
    good = sorted((shapes / "images").glob("train_*.png"))[:6]
    Image.open(good[0]).convert("RGB").save(d / "truncated.jpg", quality=95)
    (d / "truncated.jpg").write_bytes((d / "truncated.jpg").read_bytes()[:200])
    (d / "empty.jpg").write_bytes(b"")
    rows = [(str(p), f"shape number {i}") for i, p in enumerate(good)]
    rows += [(str(d / "truncated.jpg"), "truncated"), (str(d / "empty.jpg"), "zero bytes"),
             (str(d / "missing.jpg"), "missing"), (str(good[0]), "")]
    (d / "pairs.csv").write_text("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    s = _service(teacher, d / "cache").build(str(d / "pairs.csv"))
    assert s.images_encoded == 6 and s.skipped == 4
    skipped = [json.loads(l) for l in (d / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(Path(x["image"]).name for x in skipped if "image" in x) == ["empty.jpg", "missing.jpg", "truncated.jpg"]
    assert [x["reason"] for x in skipped if "caption" in x] == ["empty caption"]
    assert "4 skipped" in s.line()
    # training from that cache leaves the broken rows out instead of crashing
    result = Distiller(teacher, tiny_student(), cache=str(d / "cache"), output_dir=str(d / "run"), max_steps=2,
                       **{**FAST, "batch_size": 4}).fit(str(d / "pairs.csv"))
    assert len(result.history["loss"]) == 2


def test_cache_and_online_teacher_give_the_same_loss_curve(teacher, shapes, tmp_path):
    data = str(shapes / "train.csv")
    _service(teacher, tmp_path / "c", dtype="fp32").build(data, views=1)  # view 0 only = the eval crop
    opts = dict(max_steps=12, augment=False, **FAST)
    torch.manual_seed(0)
    online = Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "on"), **opts).fit(data)
    torch.manual_seed(0)
    cached = Distiller(None, tiny_student(), cache=str(tmp_path / "c"), output_dir=str(tmp_path / "off"),
                       **opts).fit(data)
    np.testing.assert_allclose(cached.history["loss"], online.history["loss"], rtol=2e-4, atol=2e-5)
    assert cached.student.teacher_identity == teacher.identity


def test_cache_through_builds_missing_rows(teacher, shapes, tmp_path):
    svc = _service(teacher, tmp_path / "c")
    result = Distiller(svc, tiny_student(), output_dir=str(tmp_path / "r"), max_steps=3, **FAST).fit(
        str(shapes / "train.csv"))
    assert len(result.history["loss"]) == 3
    cache = EmbeddingCache.open(tmp_path / "c")
    assert cache.manifest["counts"]["images"] == 160


def test_teacher_runs_on_the_gpu_when_there_is_one(teacher, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    svc = TeacherService(teacher, tmp_path / "c")
    assert svc.device.type == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert TeacherService(teacher, tmp_path / "c").device.type == "cpu"


def test_cache_cli_build_info_verify(shapes, tmp_path, capsys):

    from distill.cli import main

    # a saved folder teacher, so the CLI can load it by path
    from distill import create_student

    model = create_student("vit_tiny+bert_small", embed_dim=16, image_kwargs={"image_size": 32},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval()
    model.save(tmp_path / "teacher")
    args = ["--teacher", str(tmp_path / "teacher"), "--data", str(shapes / "train.csv")]
    assert main(["cache", "build", *args, "--out", str(tmp_path / "c"), "--views", "2", "--workers", "0"]) == 0
    assert "encoded 160 images" in capsys.readouterr().out
    assert main(["cache", "info", str(tmp_path / "c")]) == 0
    assert "160 images" in capsys.readouterr().out
    assert main(["cache", "verify", str(tmp_path / "c"), *args, "--sample", "3"]) == 0
    assert "OK" in capsys.readouterr().out
    # a damaged shard is caught
    f = tmp_path / "c" / "images" / "shard_00000.npy"
    a = np.load(f)
    a[0, 0] = np.nan
    np.save(f, a)
    assert main(["cache", "verify", str(tmp_path / "c")]) == 1
    assert "non-finite" in capsys.readouterr().out


def test_split_build_across_processes_equals_one_process(teacher, shapes, tmp_path):
    """What `accelerate launch` does with 2 processes (plan on both, encode every 2nd shard each,
    main process writes the manifest), run here one process after the other."""
    data = str(shapes / "train.csv")
    rows = load_rows(data)
    from distill.cache.manifest import finish_manifest, start_manifest

    svc = _service(teacher, tmp_path / "split")
    manifest = start_manifest(svc.dir, svc.expected(2, 0, (0.5, 1.0), (3 / 4, 4 / 3)))
    plans = svc.plan_images(rows), svc.plan_texts(rows)  # planned before any shard is written
    for rank in (1, 0):
        svc.encode_images(plans[0], manifest, rank=rank, world=2)
        svc.encode_texts(plans[1], manifest, rank=rank, world=2)
    finish_manifest(svc.dir, manifest)
    _service(teacher, tmp_path / "one").build(data, views=2)
    a, b = _arrays(tmp_path / "split"), _arrays(tmp_path / "one")
    assert a.keys() == b.keys() and len([k for k in a if k.startswith("images/")]) == 15  # 5 shards x 3 files
    for name in a:
        assert (a[name].tobytes() == b[name].tobytes()) if isinstance(a[name], np.ndarray) else a[name] == b[name]
    assert EmbeddingCache.open(tmp_path / "split").manifest["fingerprint"] == \
        EmbeddingCache.open(tmp_path / "one").manifest["fingerprint"]
