"""More of the fault suite (issue 14): the classes of problem a hostile-input probe found after the first
fixes. Each test would fail on the code before its fix."""
import csv
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_VIT, tiny_student
from distill import Distiller
from distill.errors import CacheError, DataError, DistillError, FileFormatError, MissingFileError, RecipeError

FAST = dict(batch_size=8, num_workers=0, progress=False, warmup_steps=1, lr=3e-3, health_every=0)


def test_losses_keep_full_precision_under_autocast():
    import torch.nn.functional as F

    from distill.losses import AffinityLoss, ContrastiveLoss, DistillLoss, Embeddings

    torch.manual_seed(0)
    ref = F.normalize(torch.randn(8, 16), dim=-1)
    s = torch.randn(8, 16)
    e = Embeddings(s_img=s, t_img=ref, t_txt=ref[[0, 1, 2, 3, 0, 1, 2, 3]])
    want = {k: m(e) for k, m in (("c", ContrastiveLoss()), ("a", AffinityLoss()))}
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            got = {k: m(e) for k, m in (("c", ContrastiveLoss()), ("a", AffinityLoss()))}
            total, _ = DistillLoss({"cosine": 1.0, "contrastive": 1.0})(e)
        assert torch.isfinite(total)
        for k in want:
            torch.testing.assert_close(got[k], want[k])


def test_a_dotted_override_sets_one_entry_of_a_mapping():
    from distill.config import load_recipe

    r = load_recipe(Path(__file__).parent.parent / "recipes" / "vit_tiny_from_vit_b32.yaml",
                    ["loss.weights.mse=0.5", "student.kwargs.image_size=64", "loss.kwargs.contrastive.queue=64",
                     "train.precision=no"])
    assert r.loss.weights == {"cosine": 1.0, "contrastive": 1.0, "mse": 0.5}
    assert r.student.kwargs == {"pretrained": True, "image_size": 64}
    assert r.loss.kwargs == {"contrastive": {"queue": 64}} and r.train.precision == "no"
    assert load_recipe(None, ["loss.weights={mse: 1}"]).loss.weights == {"mse": 1.0}  # the whole mapping: replaced
    for bad, key in (("train.seed=-1", "train.seed"), ("optim.weight_decay=.inf", "optim.weight_decay")):
        with pytest.raises(RecipeError, match=f"^{key}: "):
            load_recipe(None, [bad])


def test_student_options_and_names_are_named():
    from distill.students import create_student

    with pytest.raises(RecipeError, match="student.kwargs: got an unexpected keyword argument 'imag_size'; vit_tiny takes image_size"):
        create_student("vit_tiny", embed_dim=8, imag_size=32)
    with pytest.raises(RecipeError, match="student.kwargs.model_kwargs: .* no option 'patchsize'"):
        create_student("vit_tiny", embed_dim=8, model_kwargs={"patchsize": 8})
    with pytest.raises(KeyError, match="unknown timm model 'resnet1'. Did you mean 'resnet18'"):
        create_student("timm:resnet1", embed_dim=8)


def _write_csv(path: Path, rows, header=("image", "caption")):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([header, *rows])


def test_caption_files_that_would_lose_rows_silently(tmp_path):
    from distill.check import check_data
    from distill.data import load_rows

    (tmp_path / "images").mkdir()
    for k in range(3):
        Image.new("RGB", (20, 20), (k * 80, 0, 0)).save(tmp_path / "images" / f"{k}.png")
    # an unclosed quote would swallow the rows after it into one caption
    (tmp_path / "quote.csv").write_text('image,caption\n0.png,"a red square\n1.png,a blue one\n2.png,a green one\n')
    with pytest.raises(DataError, match=r"quote\.csv:2: a quote opened on this line is not closed"):
        load_rows(tmp_path / "quote.csv")
    # a legitimate quoted caption over two lines is kept
    (tmp_path / "multi.csv").write_text('image,caption\n0.png,"a red square\nseen from above"\n1.png,blue\n')
    assert load_rows(tmp_path / "multi.csv").captions == ["a red square\nseen from above", "blue"]
    # a column named twice
    (tmp_path / "dup.csv").write_text("image,caption,caption\n0.png,first,second\n")
    with pytest.raises(DataError, match=r"dup\.csv:1: the column 'caption' appears twice"):
        load_rows(tmp_path / "dup.csv")
    # an empty caption list is a row without a caption (reported by check), not a row that vanishes
    (tmp_path / "items.json").write_text(json.dumps([{"image": "images/0.png", "caption": ["a", "b"]},
                                                     {"image": "images/1.png", "caption": []}]))
    report = check_data(str(tmp_path / "items.json"), tmp_path / "c", workers=1, progress=False)
    assert report.rows == 3 and [(r["where"], r["reason"]) for r in report.rejected] == [
        (f"{tmp_path / 'items.json'} item 2", "empty caption")]
    # names padded with spaces still find the images/ folder beside the file
    (tmp_path / "padded.csv").write_text("image , caption\n 0.png , red\n 1.png , blue\n")
    assert all(os.path.exists(p) for p in load_rows(tmp_path / "padded.csv").images)
    # a row with a caption but no image: check rejects it, as training skips it
    _write_csv(tmp_path / "noimg.csv", [("images/0.png", "red"), ("", "a caption alone")])
    report = check_data(str(tmp_path / "noimg.csv"), None, workers=1, progress=False)
    assert [r["reason"] for r in report.rejected] == ["no image"]
    # only a header; an empty list
    (tmp_path / "hdr.csv").write_text("image,caption\n")
    with pytest.raises(DataError, match="no rows, only a header"):
        load_rows(tmp_path / "hdr.csv")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes")
def test_a_named_pipe_in_the_data_is_skipped_not_waited_on(teacher, tmp_path):
    from distill.cache import TeacherService

    (tmp_path / "img").mkdir()
    for k in range(4):
        Image.new("RGB", (20, 20), (k * 60, 0, 0)).save(tmp_path / "img" / f"{k}.png")
    os.mkfifo(tmp_path / "img" / "pipe.png")
    _write_csv(tmp_path / "pairs.csv", [(f"img/{k}.png", f"square {k}") for k in range(4)] + [("img/pipe.png", "a pipe")])
    s = TeacherService(teacher, tmp_path / "cache", num_workers=0, progress=False).build(str(tmp_path / "pairs.csv"))
    assert s.images_encoded == 4 and s.skipped == 1
    skipped = [json.loads(x) for x in (tmp_path / "cache" / "skipped.jsonl").read_text().splitlines()]
    assert [x["reason"] for x in skipped if "image" in x] == ["not a regular file"]


def test_saved_files_are_readable_by_others(tmp_path):
    from distill.io import save_tensors, write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_tensors(tmp_path / "w.safetensors", {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    for f in ("a.json", "w.safetensors"):
        assert stat.S_IMODE((tmp_path / f).stat().st_mode) == 0o644, f


def test_damaged_model_folders_name_the_file(tmp_path):
    from distill import create_student, load_student

    m = create_student("vit_tiny+bert_small", embed_dim=16, image_kwargs={"image_size": 32, "model_kwargs": TINY_VIT},
                       text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2})
    m.save(tmp_path / "m")
    w = tmp_path / "m" / "model.safetensors"
    good = w.read_bytes()
    w.write_bytes(good[:100])
    with pytest.raises(FileFormatError, match="model.safetensors: cannot be read as safetensors"):
        load_student(tmp_path / "m")
    w.write_bytes(good)
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(FileFormatError, match="config.json: cannot be read"):
        load_student(tmp_path / "m")
    m.save(tmp_path / "m")
    import shutil

    shutil.rmtree(tmp_path / "m" / "text")
    with pytest.raises(MissingFileError, match="m/text: no such folder"):
        load_student(tmp_path / "m")


def _cache(teacher, tmp_path, data):
    from distill.cache import TeacherService

    TeacherService(teacher, tmp_path / "cache", shard_size=64, num_workers=0, progress=False).build(data, views=2)
    return tmp_path / "cache"


def test_impossible_stored_crops_are_named_at_open(teacher, shapes, tmp_path):
    from distill.cache import EmbeddingCache

    cache = _cache(teacher, tmp_path, str(shapes / "train.csv"))
    f = cache / "images" / "shard_00001.views.npy"
    v = np.load(f)
    v[2, 1, 2] = np.nan
    np.save(f, v)
    with pytest.raises(CacheError, match=r"shard_00001.views.npy: row 2 .* impossible crop"):
        EmbeddingCache.open(cache)


def test_cache_only_run_with_no_usable_rows_says_so(teacher, shapes, tmp_path):
    cache = _cache(teacher, tmp_path, str(shapes / "train.csv"))
    _write_csv(tmp_path / "gone.csv", [(str(tmp_path / "nope1.png"), "x"), (str(tmp_path / "nope2.png"), "y")])
    with pytest.raises(DataError, match=r"no usable rows to train on \(2 rows skipped: 2 missing file"):
        Distiller(None, tiny_student(), cache=str(cache), output_dir=str(tmp_path / "r"), max_steps=1, **FAST).fit(
            str(tmp_path / "gone.csv"))


def test_resume_is_refused_when_image_contents_changed(teacher, tmp_path):
    from distill.errors import RunConflictError

    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(0)
    for k in range(16):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{k}.bmp")
    _write_csv(tmp_path / "pairs.csv", [(f"img/{k}.bmp", f"noise {k}") for k in range(16)])
    opts = dict(output_dir=str(tmp_path / "run"), checkpoint_every=2, **FAST)
    Distiller(teacher, tiny_student(), max_steps=2, **opts).fit(str(tmp_path / "pairs.csv"))
    a, b = (tmp_path / "img" / "0.bmp").read_bytes(), (tmp_path / "img" / "1.bmp").read_bytes()
    (tmp_path / "img" / "0.bmp").write_bytes(b)  # same names, same sizes, swapped pictures
    (tmp_path / "img" / "1.bmp").write_bytes(a)
    with pytest.raises(RunConflictError, match="data: the rows differ"):
        Distiller(teacher, tiny_student(), max_steps=4, resume=True, **opts).fit(str(tmp_path / "pairs.csv"))


def test_a_copied_teacher_folder_is_the_same_teacher(shapes, tmp_path):
    import shutil

    from distill import create_student, load_teacher
    from distill.cache import EmbeddingCache, TeacherService

    torch.manual_seed(0)
    create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": TINY_VIT},
                   text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval().save(tmp_path / "t")
    TeacherService(load_teacher(str(tmp_path / "t")), tmp_path / "cache", num_workers=0, progress=False).build(
        str(shapes / "train.csv"))
    shutil.copytree(tmp_path / "t", tmp_path / "copy")
    copy = load_teacher(str(tmp_path / "copy"))
    EmbeddingCache.open(tmp_path / "cache").check(copy)  # no mismatch: same weights, another folder
    assert copy.identity["path"] == str((tmp_path / "copy").resolve())


def test_options_that_would_be_ignored_are_refused(teacher, shapes, tmp_path):
    from distill import create_student
    from distill.config import load_recipe

    create_student("vit_tiny+bert_small", embed_dim=32, image_kwargs={"image_size": 32, "model_kwargs": TINY_VIT},
                   text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2}).eval().save(tmp_path / "t")
    r = load_recipe(None, [f"teacher.name={tmp_path / 't'}", "teacher.kwargs={no_such_option: 1}"])
    with pytest.raises(RecipeError, match="saved model folder, which takes no options"):
        Distiller(recipe=r, student=tiny_student(), output_dir=str(tmp_path / "r"), max_steps=1, **FAST).fit(
            str(shapes / "train.csv"))
    if not torch.cuda.is_available():
        with pytest.raises(RecipeError, match="train.precision: fp16 needs a CUDA GPU"):
            Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "r16"), max_steps=1, precision="fp16",
                      **FAST).fit(str(shapes / "train.csv"))


def test_damaged_pack_and_empty_templates_name_themselves(shapes, tmp_path):
    from distill.data.packed import PackedImages, pack_images
    from distill.templates import load_templates

    pack_images(str(shapes / "train.csv"), tmp_path / "pack", size=32, shard_size=64, workers=1, progress=False)
    f = tmp_path / "pack" / "images_00001.npy"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(FileFormatError, match="images_00001.npy: the packed store is damaged"):
        PackedImages(tmp_path / "pack")
    (tmp_path / "t.txt").write_text("\n  \n")
    with pytest.raises(DataError, match="no templates in the file"):
        load_templates(str(tmp_path / "t.txt"))


def test_every_error_above_is_a_distill_error():
    # the CLI prints these as one line; anything else is reported as a bug
    for cls in (CacheError, DataError, FileFormatError, MissingFileError, RecipeError):
        assert issubclass(cls, DistillError)


# -- issue 32: no command writes over, into or beside what it reads ---------------------------------------------
def _files(folder):
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def writers(tmp_path_factory):
    """Inputs for every command that writes a folder, and two finished artifacts of other kinds."""
    from distill import create_student
    from distill.check import check_data
    from distill.demo import make_shapes
    from distill.vocab import train_tokenizer

    root = tmp_path_factory.mktemp("writers")
    data = make_shapes(root / "data", n_train=24, n_test=8, size=32, seed=3)
    towers = dict(image_kwargs={"image_size": 32, "model_kwargs": dict(TINY_VIT)},
                  text_kwargs={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "context_length": 16})
    torch.manual_seed(0)
    model = create_student("vit_tiny+bert_small", embed_dim=32, **towers)
    model.save(root / "home" / "teacher")  # alone in its folder: a run may be written beside it
    model.save(root / "models" / "student")
    check_data(str(data / "train.csv"), root / "other" / "check", progress=False)
    train_tokenizer(["a red circle", "a blue square"] * 4, 100).save_pretrained(str(root / "other" / "tokenizer"))
    fit = root / "fit.yaml"
    fit.write_text(f"teacher: {{name: {root / 'home' / 'teacher'}}}\n"
                   f"student: {{name: vit_tiny, kwargs: {{image_size: 32, model_kwargs: {dict(TINY_VIT)}}}}}\n"
                   f"data: {{train: {data / 'train.csv'}, num_workers: 0}}\n"
                   "optim: {warmup_steps: 1}\n"
                   "train: {max_steps: 1, batch_size: 8, progress: false, health_every: 0}\n")
    tune = root / "tune.yaml"
    tune.write_text(f"student: {{name: vit_tiny+bert_small, kwargs: {json.dumps(towers)}}}\n"
                    f"data: {{train: {data / 'train.csv'}, num_workers: 0}}\n"
                    "tune: {embed_dim: 32}\n"
                    "train: {max_steps: 1, batch_size: 8, progress: false, health_every: 0}\n")
    return root, data


def _commands(root, data):
    """(name, argv given the output folder, the input that folder must never hold, how the command is refused)."""
    student, teacher, csv_file = root / "models" / "student", root / "home" / "teacher", data / "train.csv"
    out = [("fit", lambda o: ["fit", str(root / "fit.yaml"), f"train.output_dir={o}"], teacher),
           ("tune", lambda o: ["tune", str(root / "tune.yaml"), f"train.output_dir={o}"], csv_file),
           ("cache", lambda o: ["cache", "build", "--teacher", str(teacher), "--data", str(csv_file), "--out", str(o),
                                "--workers", "0"], teacher),
           ("data", lambda o: ["data", "check", str(csv_file), "--out", str(o)], csv_file),
           ("data", lambda o: ["data", "pack", str(csv_file), "--out", str(o), "--size", "32", "--workers", "1"],
            csv_file),
           ("tokenizer", lambda o: ["tokenizer", "train", str(csv_file), "--out", str(o), "--vocab", "100"], csv_file)]
    for fmt in ("safetensors", "onnx", "onnx-fp16", "onnx-int8", "open_clip", "sentence-transformers", "timm"):
        out.append(("export", lambda o, fmt=fmt: ["export", str(student), "--format", fmt, "--out", str(o)], student))
    return out


def test_no_command_writes_over_into_or_beside_its_inputs(writers, capsys):
    from distill.cli import main

    root, data = writers
    for name, argv, source in _commands(root, data):
        other = root / "other" / ("tokenizer" if name == "data" and "check" in argv(root)[1] else "check")
        targets = {"a folder holding another artifact": other, "its own input": source,
                   "a folder that holds one of its inputs": source.parent}
        for what, target in targets.items():
            before = _files(target)
            code = main(argv(target))
            err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
            assert code == 2, (name, what, argv(target), err[-3:])
            assert err[-1].startswith(f"distill {name}: error: ") and "Traceback" not in "".join(err), (name, what)
            assert _files(target) == before, (name, what)  # nothing written, deleted or mixed in
            assert not [p for p in target.parent.iterdir() if p.name.startswith(".distill-staging")], (name, what)


def test_where_a_flag_allows_it_the_inputs_stay_intact_and_the_folder_whole(writers, capsys):
    from distill.cli import main

    root, data = writers
    # fit and tune beside their inputs: train.overwrite writes the run next to them and touches none of them
    for recipe, folder in (("fit.yaml", root / "home"), ("tune.yaml", data)):
        before = _files(folder)
        assert main([recipe.split(".")[0], str(root / recipe), f"train.output_dir={folder}",
                     "train.overwrite=true"]) == 0, capsys.readouterr().err[-500:]
        after = _files(folder)
        assert {k: v for k, v in after.items() if k in before} == before
        assert "run.json" in after
    # --overwrite replaces another artifact whole; it never replaces an input or files we did not write
    before = _files(root / "models" / "student")
    assert main(["export", str(root / "models" / "student"), "--out", str(root / "models" / "student"),
                 "--overwrite"]) == 2
    assert _files(root / "models" / "student") == before
    before = _files(data)  # the data, with the tune run written beside it above
    assert main(["export", str(root / "models" / "student"), "--out", str(data), "--overwrite"]) == 2
    assert "also files clip-distill did not write (e.g. classes.csv)" in capsys.readouterr().err
    assert _files(data) == before
