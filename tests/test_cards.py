"""The YAML cards in teachers/ and students/ agree with the registries."""
from pathlib import Path

import pytest
import yaml

from distill.students import STUDENTS, create_student
from distill.teachers import TEACHERS

ROOT = Path(__file__).parent.parent


def _cards(folder):
    return {p.stem: yaml.safe_load(p.read_text()) for p in sorted((ROOT / folder).glob("*.yaml"))}


def test_teacher_cards_match_registry():
    cards = _cards("teachers")
    assert set(cards) == set(TEACHERS.list())
    for name, card in cards.items():
        meta = TEACHERS.meta(name)
        assert card["name"] == name and card["kind"] == "teacher"
        for key in ("source", "pretrained", "embed_dim", "image_size", "licence"):
            assert card[key] == meta[key], (name, key)
        assert card["parameters"] > 0 and card["typical_use"]


def test_openclip_teacher_card_parameter_count():
    open_clip = pytest.importorskip("open_clip")
    card = _cards("teachers")["openclip_vit_b32"]
    model = open_clip.create_model("ViT-B-32")  # random init, offline
    assert sum(p.numel() for p in model.parameters()) == card["parameters"]


@pytest.mark.parametrize("name", STUDENTS.list())
def test_student_cards_match_registry(name):
    card = _cards("students")[name]
    assert set(_cards("students")) == set(STUDENTS.list())
    meta = STUDENTS.meta(name)
    assert card["name"] == name and card["modality"] == meta["modality"]
    assert card["image_size"] == meta.get("image_size")
    s = create_student(name, embed_dim=8)
    trunk = s.image.trunk if s.image is not None else s.text.encoder
    assert sum(p.numel() for p in trunk.parameters()) == card["parameters"]
    if s.image is not None:
        assert card["source"] == f"timm:{meta['timm_name']}"
        assert s.preprocess.image_size == card["image_size"]
    for key in ("licence", "typical_use", "embed_dim"):
        assert card[key]
