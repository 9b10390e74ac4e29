import pytest
import torch

from conftest import tiny_student
from distill import Distiller, load_student
from distill.errors import NonFiniteLossError

FAST = dict(batch_size=16, num_workers=0, progress=False, warmup_steps=2, lr=3e-3)


def test_distillation_lowers_the_loss(teacher, student, shapes, tmp_path):
    result = Distiller(teacher, student, output_dir=str(tmp_path / "run"), max_steps=30, **FAST).fit(
        str(shapes / "train.csv"))
    loss = result.history["loss"]
    assert len(loss) == 30 and all(isinstance(v, float) for v in loss)
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5
    assert set(result.history) >= {"loss", "lr", "cosine", "contrastive"}
    # the saved student is the trained one and remembers its teacher
    again = load_student(result.output_dir / "student")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(again.encode_image(x), result.student.eval().encode_image(x))
    assert again.teacher_identity == teacher.identity
    assert (result.output_dir / "recipe.yaml").exists() and (result.output_dir / "log.jsonl").exists()


def _run(teacher, shapes, out, steps, resume=False, **kw):
    torch.manual_seed(0)
    return Distiller(teacher, tiny_student(), output_dir=str(out), max_steps=steps, resume=resume,
                     checkpoint_every=3, **{**FAST, **kw}).fit(str(shapes / "train.csv"))


def test_resume_matches_uninterrupted_run(teacher, shapes, tmp_path):
    full = _run(teacher, shapes, tmp_path / "full", 8, grad_accum=2)
    _run(teacher, shapes, tmp_path / "cut", 3, grad_accum=2)  # "crashes" after the step-3 checkpoint
    resumed = _run(teacher, shapes, tmp_path / "cut", 8, resume=True, grad_accum=2)
    assert resumed.history["loss"] == full.history["loss"]
    for (k, a), (_, b) in zip(full.student.state_dict().items(), resumed.student.state_dict().items()):
        assert torch.equal(a, b), k


def test_nan_guard_names_the_step(teacher, shapes, tmp_path):
    student = tiny_student()
    with torch.no_grad():
        student.image.proj.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 1 "):
        Distiller(teacher, student, output_dir=str(tmp_path / "nan"), max_steps=3, **FAST).fit(
            str(shapes / "train.csv"))


def test_text_student_distils_from_captions(teacher, shapes, tmp_path):
    from distill import create_student

    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, hidden_size=32, num_layers=1, num_heads=2)
    result = Distiller(teacher, student, output_dir=str(tmp_path / "txt"), max_steps=25, **FAST).fit(
        str(shapes / "train.csv"))
    loss = result.history["loss"]
    assert sum(loss[-5:]) < sum(loss[:5])
    assert load_student(result.output_dir / "student").modality == "text"


def test_data_errors_are_clear(teacher, student, tmp_path):
    f = tmp_path / "captions.csv"
    f.write_text("caption\na dog\n", encoding="utf-8")
    with pytest.raises(ValueError, match="image tower but the data has no images"):
        Distiller(teacher, student, output_dir=str(tmp_path / "x"), **FAST).fit(str(f))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        Distiller(teacher, student, output_dir=str(tmp_path / "x"), **FAST).fit(str(tmp_path / "nope.csv"))


def test_slow_loading_is_shown_and_warned_about_once(teacher, shapes, tmp_path, monkeypatch, caplog):
    import json

    from distill import pipeline, run
    from distill.data import RawImages

    now = [0.0]  # a clock that only the loader moves: every image takes 10 ms, a step takes no time

    class SlowReader(RawImages):  # a disk (or decoder) slower than the student
        def open(self, path):
            now[0] += 0.01
            return super().open(path)

    monkeypatch.setattr(run, "clock", lambda: now[0])
    monkeypatch.setattr(pipeline, "image_reader", lambda packed: SlowReader())
    with caplog.at_level("WARNING"):
        result = Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "slow"), max_steps=16, log_every=1,
                           health_every=0, **FAST).fit(str(shapes / "train.csv"))
    warnings = [r.getMessage() for r in caplog.records if "waiting for data takes" in r.getMessage()]
    assert len(warnings) == 1 and "data.packed" in warnings[0] and "data.num_workers" in warnings[0]
    log = [json.loads(x) for x in (tmp_path / "slow" / "log.jsonl").read_text().splitlines()]
    assert all("data_wait" in x for x in log) and log[-1]["data_wait"] > 0.25
    timing = result.extra["timing"]
    assert timing["steps"] == 16 and timing["data_s"] == pytest.approx(16 * 16 * 0.01)  # 16 batches of 16 images
    assert timing["data_wait"] == 1.0 and timing["step_s"] == 0


def test_length_grouped_batches_pad_less_and_replay_on_resume():
    import numpy as np

    from distill.data import EpochBatchSampler

    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=1000)
    plain = EpochBatchSampler(1000, 32, seed=3)
    grouped = EpochBatchSampler(1000, 32, seed=3, lengths=lengths, group=8)
    # without lengths the batches are the plain shuffled slices they always were
    perm = np.random.default_rng([3, 10_007, 0]).permutation(1000)
    assert next(iter(plain)) == perm[:32].tolist()
    it = iter(grouped)
    epoch = [next(it) for _ in range(grouped.per_epoch)]
    rows = sorted(i for b in epoch for i in b)
    assert len(rows) == len(set(rows)) == 31 * 32 and max(rows) < 1000  # each row at most once an epoch
    pad = lambda batches: np.mean([lengths[[i % 1000 for i in b]].max() for b in batches])  # noqa: E731
    it = iter(plain)
    assert pad(epoch) < 0.7 * pad([next(it) for _ in range(plain.per_epoch)])
    assert next(iter(grouped))[0] >= 0 and epoch[0] != sorted(epoch[0])  # shuffled batch order, longest first
    # resuming at batch k replays the same batches, into the next epoch
    resumed = EpochBatchSampler(1000, 32, seed=3, lengths=lengths, group=8, start_batch=29)
    it, again = iter(grouped), iter(resumed)
    seq = [next(it) for _ in range(35)]
    assert [next(again) for _ in range(6)] == seq[29:]
    assert min(seq[31]) >= 1000  # epoch 1 indices carry the epoch


def test_text_student_with_length_grouped_batches(teacher, shapes, tmp_path):
    from distill import create_student
    from distill.errors import RecipeError

    torch.manual_seed(0)
    student = create_student("bert_small", embed_dim=teacher.embed_dim, hidden_size=32, num_layers=1, num_heads=2)
    result = Distiller(teacher, student, output_dir=str(tmp_path / "txt"), max_steps=25, group_by_length=True,
                       **FAST).fit(str(shapes / "train.csv"))
    loss = result.history["loss"]
    assert sum(loss[-5:]) < 0.8 * sum(loss[:5])
    with pytest.raises(RecipeError, match="data.group_by_length"):
        Distiller(teacher, tiny_student(), output_dir=str(tmp_path / "img"), max_steps=2, group_by_length=True,
                  **FAST).fit(str(shapes / "train.csv"))


def test_resumed_text_student_with_dropout_matches_uninterrupted_run(teacher, shapes, tmp_path):
    from distill import create_student

    def run(out, steps, resume=False):
        torch.manual_seed(0)
        student = create_student("bert_small", embed_dim=teacher.embed_dim, hidden_size=32, num_layers=1, num_heads=2)
        assert student.text.encoder.config.hidden_dropout_prob > 0  # dropout draws from the global generator
        return Distiller(teacher, student, output_dir=str(out), max_steps=steps, resume=resume, checkpoint_every=3,
                         group_by_length=True, **FAST).fit(str(shapes / "train.csv"))

    full = run(tmp_path / "full", 12)
    run(tmp_path / "cut", 3)
    resumed = run(tmp_path / "cut", 12, resume=True)
    assert resumed.history["loss"] == full.history["loss"]


def test_run_identity_records_only_what_differs_from_the_defaults():
    from distill.config import Recipe, apply_options
    from distill.run import _with_defaults, run_identity

    plain = run_identity(Recipe())
    assert all(not v for v in plain["recipe"].values())  # an option added later, at its default, changes nothing
    tuned = run_identity(apply_options(Recipe(), {"lr": 3e-3, "group_by_length": True, "max_steps": 7}))
    assert tuned["recipe"]["optim"] == {"lr": 3e-3} and tuned["recipe"]["data"] == {"group_by_length": True}
    assert _with_defaults(plain)["recipe"]["optim"]["lr"] == Recipe().optim.lr  # named in full when runs differ
