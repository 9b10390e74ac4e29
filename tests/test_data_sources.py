"""Bring your own data: every format gives the same rows, bad data is checked and skipped, packing."""
import csv
import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from distill.errors import DataError

CAPTIONS = {
    "red.png": ["a red square", "一个红色的正方形"],
    "green.png": ["緑の円です 🟢"],
    "blue.png": ["a blue triangle 🔺", "蓝色三角形"],
    "mix.png": ["stripes of many colours"],
}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("byod")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for name in CAPTIONS:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / "img" / name)
    return root


def pairs(rows):
    """(sha of decoded pixels, caption), sorted: comparable across path schemes."""
    from distill.data import open_image

    return sorted((hashlib.sha1(open_image(p).tobytes()).hexdigest(), c) for p, c in zip(rows.images, rows.captions))


def write_formats(root):
    flat = [(f"img/{n}", c) for n, caps in CAPTIONS.items() for c in caps]
    out = {}
    with open(root / "pairs.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image", "caption"), *flat])
    out["csv"] = root / "pairs.csv"
    with open(root / "pairs.tsv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="\t").writerows([("image", "caption"), *flat])
    out["tsv"] = root / "pairs.tsv"
    with open(root / "named.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("image_path", "text"), *flat])
    out["named csv"] = root / "named.csv"
    (root / "pairs.json").write_text(json.dumps(
        [{"image": f"img/{n}", "caption": caps} for n, caps in CAPTIONS.items()], ensure_ascii=False), encoding="utf-8")
    out["json (caption lists)"] = root / "pairs.json"
    (root / "pairs.jsonl").write_text("".join(json.dumps({"image": f"img/{i}", "caption": c}, ensure_ascii=False) + "\n"
                                              for i, c in [(p[4:], c) for p, c in flat]), encoding="utf-8")
    out["jsonl"] = root / "pairs.jsonl"
    meta = root / "img_meta"
    meta.mkdir(exist_ok=True)
    for n in CAPTIONS:
        (meta / n).write_bytes((root / "img" / n).read_bytes())
    (meta / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}, ensure_ascii=False) + "\n"
                                                 for n, caps in CAPTIONS.items() for c in caps), encoding="utf-8")
    out["folder + metadata.jsonl"] = meta
    shards = root / "shards"
    shards.mkdir(exist_ok=True)
    for k, (n, caps) in enumerate(CAPTIONS.items()):
        with tarfile.open(shards / f"shard-{k // 2:04d}.tar", "a") as tar:
            for name, data in ((f"{k:05d}.png", (root / "img" / n).read_bytes()),
                               (f"{k:05d}.json", json.dumps({"caption": caps}, ensure_ascii=False).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out["webdataset tars"] = shards
    return out


def test_every_format_yields_the_same_rows(source):
    from distill.data import load_rows

    formats = write_formats(source)
    expected = pairs(load_rows(formats["csv"]))
    assert len(expected) == 6 and any("🟢" in c for _, c in expected)
    for name, path in formats.items():
        assert pairs(load_rows(path)) == expected, name
    assert pairs(load_rows(str(source / "shards" / "shard-*.tar"))) == expected


def test_hugging_face_dataset_dir(source, tmp_path):
    datasets = pytest.importorskip("datasets")
    from distill.data import load_rows

    names = [n for n, caps in CAPTIONS.items() for _ in caps]
    ds = datasets.Dataset.from_dict({"img": [str(source / "img" / n) for n in names],
                                     "sentence": [c for caps in CAPTIONS.values() for c in caps]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hfds"))
    rows = load_rows(f"hf:{tmp_path / 'hfds'}")
    assert pairs(rows) == pairs(load_rows(write_formats(source)["csv"]))
    with pytest.raises(DataError, match="no caption column 'nope'"):
        load_rows(f"hf:{tmp_path / 'hfds'}", caption_column="nope")


def test_chinese_captions_reach_the_tokenizer_intact(source):
    from distill.data import load_rows
    from distill.students.text import bert_tokenizer

    rows = load_rows(write_formats(source)["jsonl"])
    caption = next(c for c in rows.captions if c.startswith("一个"))
    assert caption == "一个红色的正方形"
    tok = bert_tokenizer()
    tokens = tok.convert_ids_to_tokens(tok([caption])["input_ids"][0])[1:-1]
    # one token per CJK character, intact; the English WordPiece vocabulary lacks some (-> [UNK]):
    # Chinese data wants a multilingual text student (hf:<multilingual encoder>)
    vocab = tok.get_vocab()
    assert tokens == [ch if ch in vocab else "[UNK]" for ch in caption]
    assert sum(t != "[UNK]" for t in tokens) >= 4


@pytest.fixture
def broken(tmp_path):
    """A folder with a truncated JPEG, a 0-byte file, a missing path, a PNG with alpha and an empty caption."""
    rng = np.random.default_rng(1)
    good = []
    for k in range(12):
        Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)).save(tmp_path / f"ok{k}.jpg")
        good.append((f"ok{k}.jpg", f"good picture number {k}"))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "zero.jpg").write_bytes(b"")
    rgba = rng.integers(0, 255, (36, 36, 4), dtype=np.uint8)
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    rows = good + [("truncated.jpg", "a truncated photo"), ("zero.jpg", "an empty file"),
                   ("missing.jpg", "a file that is not there"), ("alpha.png", "a see-through square"), ("ok0.jpg", "")]
    with open(tmp_path / "data.csv", "w", newline="") as f:
        csv.writer(f).writerows([("image", "caption"), *rows])
    return tmp_path / "data.csv"


def test_check_reports_exactly_the_broken_rows(broken, tmp_path):
    from distill.check import check_data
    from distill.data import load_rows, open_image

    out = tmp_path / "checked"
    report = check_data(str(broken), out, workers=2, progress=False)
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    reasons = {r["image"].rsplit("/", 1)[-1] + "|" + r["caption"]: r["reason"].split(" (")[0] for r in rejected}
    assert reasons == {"truncated.jpg|a truncated photo": "corrupt or truncated image",
                       "zero.jpg|an empty file": "empty file", "missing.jpg|a file that is not there": "missing file",
                       "ok0.jpg|": "empty caption"}
    assert [n["problem"].split(" (")[0] for n in report.notes] == ["image with alpha"]
    clean = load_rows(out / "clean.jsonl")
    assert len(clean) == report.clean == 13 and all(clean.captions)
    assert open_image(str(broken.parent / "alpha.png")).getpixel((0, 0)) == (255, 255, 255)  # alpha onto white


def test_check_cli_exit_code_and_duplicates(broken, tmp_path):
    from distill.cli import main

    (broken.parent / "copy.jpg").write_bytes((broken.parent / "ok1.jpg").read_bytes())
    with open(broken, "a", newline="") as f:
        csv.writer(f).writerow(("copy.jpg", "the same picture again"))
    assert main(["data", "check", str(broken), "--out", str(tmp_path / "c")]) == 0
    notes = json.loads((tmp_path / "c" / "report.json").read_text())["notes"]
    assert any(n["problem"].startswith("duplicate image") and n["image"].endswith("copy.jpg") for n in notes)
    bad = tmp_path / "bad.csv"
    bad.write_text("image,caption\nmissing.jpg,nothing here\n")
    assert main(["data", "check", str(bad), "--out", str(tmp_path / "b")]) == 1


def test_training_and_cache_skip_bad_rows(broken, teacher, student, tmp_path):
    from distill import Distiller

    opts = dict(max_steps=3, batch_size=4, lr=1e-3, warmup_steps=1, num_workers=0, progress=False, cpu=True,
                image_size=32, health_every=0)
    online = Distiller(teacher, student, output_dir=str(tmp_path / "online"), **opts).fit(str(broken))
    assert len(online.history["loss"]) == 3 and online.extra["skipped"] == 4
    cached = Distiller(teacher, student, output_dir=str(tmp_path / "cached"), cache=str(tmp_path / "cache"),
                       **opts).fit(str(broken))
    assert len(cached.history["loss"]) == 3 and cached.extra["skipped"] == 4
    for run in ("online", "cached"):  # each run lists every row it left out, once, with the reason
        skipped = [json.loads(line) for line in (tmp_path / run / "skipped.jsonl").read_text().splitlines()]
        assert sorted(s["reason"].split(" (")[0] for s in skipped) == [
            "corrupt or truncated image", "empty caption", "empty file", "missing file"]
    # rows the data layer already rejected never reach the teacher; the cache lists what it could not decode
    in_cache = [json.loads(line) for line in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"].split(" (")[0] for s in in_cache] == ["corrupt or truncated image"]


def test_packed_store_replays_the_same_crops(source, tmp_path):
    from distill.data import RawImages, load_rows
    from distill.data.packed import PackedImages, pack_images
    from distill.transforms import crop_resize, random_view

    rows = load_rows(write_formats(source)["csv"])
    summary = pack_images(rows, tmp_path / "pack", size=96, workers=1, progress=False)
    assert summary.images == 4 and not summary.skipped
    packed, raw = PackedImages(tmp_path / "pack"), RawImages()
    rng = np.random.default_rng(0)
    for p in rows.images:
        (im_p, size_p), (im_r, size_r) = packed.open(p), raw.open(p)
        assert size_p == size_r == (48, 40) and im_p.size == (96, 96)
        v = random_view(rng, *size_r, scale=(0.5, 1.0))
        a, b = crop_resize(im_p, v, 32).astype(float), crop_resize(im_r, v, 32).astype(float)
        # the same region, resampled from the packed copy: close, while another crop is not
        other = crop_resize(im_r, random_view(np.random.default_rng(99), *size_r, scale=(0.1, 0.2)), 32)
        assert np.abs(a - b).mean() < 0.6 * np.abs(b - other).mean()


def test_training_reads_the_packed_store(shapes, teacher, student, tmp_path):
    from distill import Distiller
    from distill.data.packed import pack_images

    pack_images(str(shapes / "train.csv"), tmp_path / "pack", size=32, workers=1, progress=False)
    res = Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=4, batch_size=16, lr=1e-3,
                    warmup_steps=1, num_workers=0, progress=False, cpu=True, image_size=32,
                    packed=str(tmp_path / "pack")).fit(str(shapes / "train.csv"))
    assert res.history["loss"][-1] < res.history["loss"][0]
