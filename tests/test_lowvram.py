"""Low-VRAM switches and the memory planner (CPU: the documented formula)."""
import pytest
import torch

from conftest import TINY_VIT


def tiny_recipe(**train):
    from distill.config import Recipe, apply_options

    r = Recipe()
    r.student.name = "vit_tiny"
    r.student.kwargs = {"model_kwargs": dict(TINY_VIT, depth=2)}
    r.data.image_size = 32
    return apply_options(r, {"batch_size": 64, "grad_accum": 4, **train})


def test_parse_size():
    from distill.plan import parse_size

    assert parse_size("8GB") == parse_size("8 GiB") == 8 * 2**30
    assert parse_size("7500MB") == 7500 * 2**20
    with pytest.raises(ValueError, match="--vram"):
        parse_size("lots")


def test_plan_fits_the_budget_and_reaches_the_effective_batch():
    from distill.plan import make_plan, probe

    probes = probe(tiny_recipe(), "cpu", embed_dim=32)
    plain, ckpt = probes
    assert not plain.checkpointing and ckpt.checkpointing
    assert ckpt.per_sample_bytes < plain.per_sample_bytes  # checkpointing keeps fewer activations
    roomy = make_plan(tiny_recipe(), 2**30, "cpu")
    assert roomy.batch_size == 256 and roomy.grad_accum == 1 and not roomy.checkpointing
    budget = int(plain.fixed_bytes + 20 * plain.per_sample_bytes)  # room for ~16 samples without checkpointing
    tight = make_plan(tiny_recipe(), budget, "cpu")
    chosen = next(p for p in tight.probes if p.checkpointing == tight.checkpointing)
    assert chosen.peak(tight.batch_size) <= tight.budget
    assert tight.batch_size * tight.grad_accum >= 256 and tight.queue == 1024
    assert "train.grad_accum=" in tight.overrides()


def test_grad_checkpointing_and_channels_last_train_the_same(teacher, shapes, tmp_path):
    from conftest import tiny_student
    from distill import Distiller

    losses = {}
    for name, opts in {"plain": {}, "ckpt": {"grad_checkpointing": True}, "cl": {"channels_last": True}}.items():
        torch.manual_seed(0)
        res = Distiller(teacher, tiny_student(), output_dir=str(tmp_path / name), max_steps=3, batch_size=8,
                        lr=1e-3, warmup_steps=1, num_workers=0, progress=False, cpu=True, image_size=32,
                        health_every=0, **opts).fit(str(shapes / "train.csv"))
        losses[name] = res.history["loss"]
    assert losses["ckpt"] == pytest.approx(losses["plain"], rel=1e-4)
    assert losses["cl"] == pytest.approx(losses["plain"], rel=1e-3)


def test_8bit_optimizer_needs_a_gpu():
    from distill.config import OptimCfg
    from distill.optim import make_optimizer

    with pytest.raises(ValueError, match="adamw8bit needs a CUDA GPU"):
        make_optimizer(torch.nn.Linear(2, 2), OptimCfg(optimizer="adamw8bit"), torch.device("cpu"))
    with pytest.raises(ValueError, match="optim.optimizer"):
        make_optimizer(torch.nn.Linear(2, 2), OptimCfg(optimizer="sgd"), torch.device("cpu"))
