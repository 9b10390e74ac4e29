import copy
import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_OPENCLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 24, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
TINY_VIT = {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="session")
def _teacher():
    import torch

    from distill import load_teacher

    torch.manual_seed(0)
    return load_teacher("openclip:tiny-test", model_cfg=TINY_OPENCLIP)


@pytest.fixture
def teacher(_teacher):
    return copy.deepcopy(_teacher)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small generated captioned image set (train.csv / test.csv / classes.csv)."""
    from distill.demo import make_shapes

    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", n_train=160, n_test=40, size=32, seed=1)


def tiny_student(embed_dim=32, **kw):
    from distill import create_student

    return create_student("vit_tiny", embed_dim=embed_dim, image_size=32, model_kwargs=dict(TINY_VIT), **kw)


@pytest.fixture
def student():
    import torch

    torch.manual_seed(0)
    return tiny_student()
