"""Photo search: index a folder with a student (PyTorch or an ONNX export, without torch), search it by text or
by an example photo, re-index incrementally, and refuse what cannot work in one line."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VIT

pytest.importorskip("usearch")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A two-tower student saved and exported to ONNX, and a folder of photos in nested subfolders."""
    from distill import create_student
    from distill.demo import make_shapes
    from distill.export import export

    root = tmp_path_factory.mktemp("search")
    data = make_shapes(root / "data", n_train=40, n_test=8, size=32, seed=5)
    photos = root / "photos"
    for i, src in enumerate(sorted((data / "images").glob("train_*.png"))):
        dst = photos / f"y{i % 2}" / f"m{i % 3}" / src.name  # a photo library: folders of folders
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    torch.manual_seed(0)
    model = create_student("vit_tiny+bert_small", embed_dim=32,
                           image_kwargs={"image_size": 32, "model_kwargs": dict(TINY_VIT)},
                           text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16})
    model.save(root / "student")
    export(root / "student", root / "onnx", format="onnx")
    torch.manual_seed(1)
    other = create_student("vit_tiny", embed_dim=32, image_size=32, model_kwargs=dict(TINY_VIT))
    other.save(root / "other")
    return root, photos


def _brute_force(encoder, paths, query_vec):
    from distill.data import open_image

    emb = encoder.encode_images([open_image(p) for p in paths])
    order = np.argsort(-(emb @ query_vec))
    return [paths[i] for i in order], np.sort(emb @ query_vec)[::-1]


def test_search_ranks_as_the_model_does_and_finds_a_photo_by_itself(setup, tmp_path):
    from distill.search import Searcher, index_photos, open_encoder, photo_paths

    root, photos = setup
    summary = index_photos(photos, tmp_path / "ix", root / "student", progress=False)
    paths = photo_paths(photos)
    assert summary.photos == len(paths) == 40 and summary.embedded == 40 and not summary.skipped
    searcher = Searcher(tmp_path / "ix")  # the model recorded at build time
    result = searcher.text("a small red circle", k=5)
    query = open_encoder(root / "student").encode_texts(["a small red circle"])[0]
    want, scores = _brute_force(searcher.encoder, paths, query)
    assert [h.path for h in result.hits] == want[:5]
    assert np.allclose([h.score for h in result.hits], scores[:5], atol=2e-3)  # float16 vectors
    by_photo = searcher.image(paths[7], k=3).hits
    assert by_photo[0].path == paths[7] and by_photo[0].score > 0.999


def test_the_onnx_export_indexes_and_searches_without_torch_and_agrees_with_pytorch(setup, tmp_path):
    root, photos = setup
    script = f"""
import sys, json
sys.modules["torch"] = None  # importing torch anywhere below fails
from distill.search import index_photos, search_photos
s = index_photos({str(photos)!r}, {str(tmp_path / 'ix')!r}, {str(root / 'onnx')!r}, progress=False)
hits = search_photos({str(tmp_path / 'ix')!r}, "a big blue square", k=40).hits
print(json.dumps([s.photos, [[h.path, h.score] for h in hits]]))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    count, hits = json.loads(p.stdout.strip().splitlines()[-1])
    from distill.search import Searcher, index_photos

    index_photos(photos, tmp_path / "pt", root / "student", progress=False)
    ref = Searcher(tmp_path / "pt").text("a big blue square", k=40).hits
    assert count == 40
    onnx_scores = dict((p, s) for p, s in hits)
    assert max(abs(onnx_scores[h.path] - h.score) for h in ref) < 5e-3
    # the ONNX export records the PyTorch weights it came from: it searches the PyTorch model's index
    assert Searcher(tmp_path / "pt", model=root / "onnx").text("a big blue square", k=3).hits


def test_an_index_opened_before_the_onnx_model_still_searches(setup, tmp_path):
    """usearch loaded before onnxruntime crashed the process on import (SIGSEGV): the index loads onnxruntime first."""
    root, photos = setup
    index_photos_in_a_process = f"""
from distill.search import PhotoIndex, index_photos, open_encoder
index_photos({str(photos)!r}, {str(tmp_path / 'ix')!r}, {str(root / 'onnx')!r}, progress=False)
"""
    p = subprocess.run([sys.executable, "-c", index_photos_in_a_process], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    script = f"""
from distill.search import PhotoIndex, open_encoder
index = PhotoIndex({str(tmp_path / 'ix')!r})
print(len(index.vectors()))
enc = open_encoder({str(root / 'onnx')!r})
print(len(index.search(enc.encode_texts(["a big blue square"]), k=3)[0]))
"""
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"exit {p.returncode}: {p.stderr[-2000:]}"
    assert p.stdout.split() == ["40", "3"]


def test_indexing_again_embeds_only_new_and_changed_photos_and_drops_deleted_ones(setup, tmp_path):
    from distill.search import PhotoIndex, index_photos

    root, src = setup
    photos = tmp_path / "photos"
    shutil.copytree(src, photos)
    index_photos(photos, tmp_path / "ix", root / "onnx", progress=False)
    files = sorted(photos.rglob("*.png"))
    new = photos / "new"
    new.mkdir()
    for i in range(3):  # three new photos
        Image.new("RGB", (40, 40), (30 * i, 200, 10)).save(new / f"n{i}.png")
    files[0].unlink()  # one deleted
    shutil.copyfile(files[1], photos / "copy_of_1.png")  # the same photo at a second path: no new embedding
    im = Image.open(files[2]).convert("RGB")
    im.putpixel((0, 0), (255, 0, 255))
    im.save(files[2])  # one changed
    s = index_photos(photos, tmp_path / "ix", root / "onnx", progress=False)
    assert (s.embedded, s.removed, s.photos) == (3 + 1, 1 + 1, 40 - 1 + 3)  # the changed photo's old version left
    ix = PhotoIndex(tmp_path / "ix")
    hit = ix.search(ix.vector_of(next(iter(_keys(ix, photos / "copy_of_1.png")))), k=1)[0][0]
    assert sorted(hit.paths) == sorted([str(files[1]), str(photos / "copy_of_1.png")])
    assert index_photos(photos, tmp_path / "ix", root / "onnx", progress=False).embedded == 0


def _keys(ix, path):
    return [k for (k,) in ix.db.execute("SELECT key FROM paths WHERE path = ?", (str(path),))]


def test_a_stopped_run_keeps_what_it_embedded(setup, tmp_path, monkeypatch):
    from distill.search import PhotoIndex, index_photos, open_encoder

    root, photos = setup
    encoder = open_encoder(root / "onnx")
    calls = {"n": 0}
    real = encoder.encode_images

    def dies_on_the_third_batch(images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(encoder, "encode_images", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        index_photos(photos, tmp_path / "ix", encoder, batch_size=8, progress=False)
    assert len(PhotoIndex(tmp_path / "ix")) == 16  # two batches of 8 committed
    monkeypatch.undo()
    assert index_photos(photos, tmp_path / "ix", root / "onnx", batch_size=8, progress=False).embedded == 40 - 16


def test_bad_photos_are_skipped_and_listed(setup, tmp_path):
    from distill.search import index_photos

    root, src = setup
    photos = tmp_path / "photos"
    shutil.copytree(src / "y0", photos)
    (photos / "empty.jpg").write_bytes(b"")
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    Image.new("RGB", (8, 8)).save(photos / "tiny.png")
    huge = Image.new("L", (10_000, 9_000))  # 90 MP: over the decompression-bomb limit, refused from its header
    huge.save(photos / "huge.png")
    s = index_photos(photos, tmp_path / "ix", root / "onnx", progress=False)
    why = dict((Path(p).name, r) for p, r in s.skipped)
    assert set(why) == {"empty.jpg", "broken.png", "tiny.png", "huge.png"}
    assert "empty file" in why["empty.jpg"] and "too small" in why["tiny.png"] and "too large" in why["huge.png"]
    assert s.photos == 20


def test_an_index_refuses_another_model_naming_both(setup, tmp_path):
    from distill.errors import PhotoIndexError
    from distill.search import Searcher, index_photos

    root, photos = setup
    index_photos(photos, tmp_path / "ix", root / "onnx", progress=False)
    with pytest.raises(PhotoIndexError, match=r"built by onnx \(image weights [0-9a-f]{16}\); other has other image"):
        index_photos(photos, tmp_path / "ix", root / "other", progress=False)
    with pytest.raises(PhotoIndexError, match="built by onnx .* other has other image weights"):
        Searcher(tmp_path / "ix", model=root / "other").image(str(sorted(photos.rglob("*.png"))[0]))


def test_cli_index_search_and_one_line_errors(setup, tmp_path, capsys):
    from distill.cli import main

    root, photos = setup
    ix = tmp_path / "ix"
    assert main(["index", str(photos), "--model", str(root / "onnx"), "--out", str(ix)]) == 0
    assert "40 photos (40 embedded now, 0 removed, 0 skipped)" in capsys.readouterr().out
    assert main(["search", str(ix), "a green triangle", "-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["hits"]) == 3 and out["hits"][0]["score"] >= out["hits"][1]["score"] >= out["hits"][2]["score"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for argv, words in ((["index", str(empty), "--model", str(root / "onnx"), "--out", str(tmp_path / "e")],
                         "no photos in it"),
                        (["search", str(tmp_path / "nothing"), "a dog"], "no such folder"),
                        (["index", str(photos), "--model", str(root / "onnx"), "--out", str(root / "student")],
                         "holds a saved model"),
                        (["index", str(photos), "--model", str(root / "onnx"), "--out", str(root)],
                         "the photos")):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)


def test_a_read_only_index_searches_and_refuses_writes_in_one_line(setup, tmp_path, capsys, monkeypatch):
    import hashlib

    from distill.cli import main

    root, photos = setup
    ix = tmp_path / "ix"
    assert main(["index", str(photos), "--model", str(root / "onnx"), "--out", str(ix)]) == 0
    capsys.readouterr()
    files = lambda: {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in ix.iterdir()}  # noqa: E731
    before = files()
    modes = {p: p.stat().st_mode for p in [ix, *ix.iterdir()]}
    for p in modes:
        p.chmod(0o555 if p.is_dir() else 0o444)
    if os.access(ix, os.W_OK):  # root writes anyway: the check then sees what a user's read-only folder shows
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if (mode & os.W_OK and Path(p) == ix)
                            else real(p, mode, **kw))
    try:
        assert main(["search", str(ix), "a red circle", "-k", "2"]) == 0
        assert len(capsys.readouterr().out.strip().splitlines()) == 2
        assert files() == before  # searching writes nothing (no journal, no rebuilt vectors)
        photos_changed = tmp_path / "more"
        shutil.copytree(photos, photos_changed)
        Image.new("RGB", (40, 40), (1, 2, 3)).save(photos_changed / "new.png")
        assert main(["index", str(photos_changed), "--model", str(root / "onnx"), "--out", str(ix)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "read-only" in err[0], err
        assert files() == before
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


def test_a_query_the_tokenizer_cannot_read_still_searches_with_a_note(setup, tmp_path):
    from distill.search import Searcher, index_photos

    root, photos = setup
    index_photos(photos, tmp_path / "ix", root / "onnx", progress=False)
    searcher = Searcher(tmp_path / "ix")
    assert searcher.text("a red circle").notes == []
    result = searcher.text("ㄱㄴㄷ ᚠᚢᚦ ⴰⴱⴳ", k=4)  # scripts the small BERT vocabulary does not hold
    assert len(result.hits) == 4 and "unknown to onnx's tokenizer" in result.notes[0]
