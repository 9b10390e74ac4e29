"""Issue 21: one image, one cache key, however the data is spelled."""
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_student
from distill import Distiller
from distill.cache import CacheError, CacheMissError, EmbeddingCache, TeacherService, lookup
from distill.data import Rows, load_rows


@pytest.fixture
def built(teacher, tmp_path):
    """A data folder with 24 photos listed by one CSV, and a cache of it."""
    data = tmp_path / "data"
    (data / "photos").mkdir(parents=True)
    rng = np.random.default_rng(3)
    for k in range(24):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(data / "photos" / f"p{k:02d}.jpg")
    (data / "pairs.csv").write_text("image,caption\n" + "".join(f"photos/p{k:02d}.jpg,photo {k}\n" for k in range(24)))
    TeacherService(teacher, tmp_path / "cache", shard_size=10, batch_size=8, num_workers=0, progress=False).build(
        str(data / "pairs.csv"), views=2)
    return data, EmbeddingCache.open(tmp_path / "cache")


def _misses(rows, cache):
    found = lookup(rows, cache, progress=False)
    return found.missing, found


def test_the_same_images_however_reached_hit_the_cache(built, tmp_path):
    data, cache = built
    reference = lookup(load_rows(data / "pairs.csv"), cache, progress=False).image_keys
    # another CSV, in another folder, with ../ paths
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "list.csv").write_text(
        "caption,image\n" + "".join(f"photo {k},../data/photos/p{k:02d}.jpg\n" for k in range(24)))
    # a symlinked folder
    os.symlink(data, tmp_path / "link")
    # relative paths from another working directory
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path / "elsewhere")
        relative = load_rows("../data/pairs.csv")
    finally:
        os.chdir(cwd)
    spellings = {
        "other csv": load_rows(tmp_path / "elsewhere" / "list.csv"),
        "symlink": load_rows(tmp_path / "link" / "pairs.csv"),
        "relative from another cwd": relative,
        "in-memory Rows, another source label": Rows([str(data / "photos" / f"p{k:02d}.jpg") for k in range(24)],
                                                     [f"photo {k}" for k in range(24)], source="somewhere/else.csv"),
        "two sources joined": Rows([str(tmp_path / "link" / "photos" / f"p{k:02d}.jpg") for k in range(24)],
                                   [f"photo {k}" for k in range(24)], source="a.csv+b.csv"),
    }
    for name, rows in spellings.items():
        missing, found = _misses(rows, cache)
        assert missing == [] and not found.skipped, name
        assert sorted(found.image_keys) == sorted(reference), name


def test_a_moved_data_folder_still_hits_and_a_new_image_is_the_only_miss(built, tmp_path):
    data, cache = built
    moved = shutil.move(str(data), str(tmp_path / "moved_data"))
    rows = load_rows(Path(moved) / "pairs.csv")
    assert _misses(rows, cache)[0] == []
    Image.fromarray(np.full((36, 40, 3), 7, np.uint8)).save(Path(moved) / "photos" / "new.jpg")
    with open(Path(moved) / "pairs.csv", "a") as f:
        f.write("photos/new.jpg,a new photo\n")
    rows = load_rows(Path(moved) / "pairs.csv")
    missing, _ = _misses(rows, cache)
    assert [rows.images[i] for i in missing] == [str(Path(moved) / "photos" / "new.jpg")]


def test_an_edited_image_is_a_miss_even_at_the_same_size_and_path(built):
    data, cache = built
    path = data / "photos" / "p03.jpg"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(path)
    rows = load_rows(data / "pairs.csv")
    missing, _ = _misses(rows, cache)
    assert [Path(rows.images[i]).name for i in missing] == ["p03.jpg"]


def test_missing_rows_are_counted_and_shown_next_to_the_closest_cached(built, tmp_path, monkeypatch):
    data, cache = built
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(11)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (36, 40, 3), dtype=np.uint8)).save(other / f"p{k:02d}.jpg")
    (other / "pairs.csv").write_text("image,caption\n" + "".join(f"p{k:02d}.jpg,photo {k}\n" for k in range(3)) +
                                     "".join(f"{data}/photos/p{k:02d}.jpg,photo {k}\n" for k in range(3, 24)))
    monkeypatch.setattr("distill.teachers.load_teacher",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("a teacher was loaded")))
    with pytest.raises(CacheMissError) as err:
        Distiller(None, tiny_student(), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"), max_steps=1,
                  num_workers=0, progress=False, health_every=0).fit(str(other / "pairs.csv"))
    msg = str(err.value)
    assert msg.startswith("3 of 24 rows have no teacher embedding in the cache")
    assert f"{other / 'pairs.csv'}:2: {other / 'p00.jpg'} (closest cached: {data / 'photos' / 'p00.jpg'})" in msg
    assert f"{other / 'pairs.csv'}:3: {other / 'p01.jpg'}" in msg


def test_caches_of_the_old_path_keyed_format_are_refused_with_a_rebuild_message(built, tmp_path):
    _, cache = built
    manifest = json.loads((cache.path / "manifest.json").read_text())
    manifest["format"] = "clip-distill-cache/1"
    (cache.path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="older clip-distill .* rebuild it"):
        EmbeddingCache.open(cache.path)


def test_training_from_a_moved_folder_reads_the_cache_only(built, tmp_path):
    data, _ = built
    moved = shutil.move(str(data), str(tmp_path / "moved"))
    torch.manual_seed(0)
    result = Distiller(None, tiny_student(), cache=str(tmp_path / "cache"), output_dir=str(tmp_path / "run"),
                       max_steps=2, batch_size=8, num_workers=0, progress=False, health_every=0).fit(
        str(Path(moved) / "pairs.csv"))
    assert len(result.history["loss"]) == 2 and result.extra["skipped"] == 0
