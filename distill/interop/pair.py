"""An image student + its teacher's text tower = a two-tower model for zero-shot and retrieval."""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import ExportError
from ..students.base import POOLING, OpenClipTextTower, Student, TextTower, keep_space


def _refuse(message: str) -> Exception:
    return ExportError(message)


def _text_teacher_tower(teacher: Any) -> TextTower:
    """A ``text:`` teacher's encoder with its exact pooling and context length, and an identity head
    (the pooled output is its embedding)."""
    if teacher.pooling not in POOLING:
        raise _refuse(f"teacher {teacher.name!r}: {teacher.pooling} pooling cannot be kept (a text tower pools by "
                      f"{', '.join(POOLING)})")
    spec = {"arch": f"text:{teacher.name}", "pooling": teacher.pooling, "context_length": teacher.context_length,
            "proj_bias": False}
    encoder = copy.deepcopy(teacher.encoder)
    if getattr(encoder, "pooler", None) is not None:  # unused by pooling; saved towers are rebuilt without one
        encoder.pooler = None
    tower = TextTower(encoder, teacher._tokenizer, teacher.embed_dim, spec)
    keep_space(tower.proj)
    return tower


def _open_clip_teacher_tower(teacher: Any) -> OpenClipTextTower:
    """An open_clip teacher's own text tower (its config, weights, tokenizer and logit scale)."""
    from ..students.open_clip import openclip_text_tower

    cfg = getattr(teacher, "model_cfg", None)
    if not cfg or "text_cfg" not in cfg:
        raise _refuse(f"open_clip teacher {teacher.name!r}: its architecture config is unknown, so its text tower "
                      "cannot be rebuilt; load it with load_teacher('openclip:<arch>')")
    model = teacher.model
    spec = {"arch": f"openclip:{teacher.name}", "openclip": teacher.name,
            "model_cfg": {k: copy.deepcopy(v) for k, v in cfg.items() if k != "vision_cfg"},
            "logit_scale": float(model.logit_scale.detach().reshape(-1)[0])}
    tower = openclip_text_tower(spec, teacher._tokenizer)
    if hasattr(model, "text"):  # CustomTextCLIP
        state = model.text.state_dict()
    else:  # CLIP keeps the text tower's parts at the top level, under the same names
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(("visual.", "logit_"))}
    tower.encoder.load_state_dict(state, strict=True)
    return tower.eval()


def pair_with_teacher_text(student: Student, teacher: Any) -> Student:
    """An image-only student + the teacher's text tower as one two-tower Student (``save()`` it; it
    loads with load_student / load_teacher for zero-shot, and exports to open_clip).

    Teachers: folders saved by this library (tuned / LiT / demo teachers: their text tower as is),
    ``text:`` teachers (encoder + the same pooling and context length) and open_clip teachers (their
    own text tower, tokenizer and logit scale). The paired text embeddings equal the teacher's;
    anything that could not be kept exactly is refused. HF CLIP teachers are not supported."""
    if student.image is None:
        raise _refuse("pairing needs an image student")
    backend = getattr(teacher, "backend", None)
    if backend == "folder" and teacher.model.text is not None:
        text = copy.deepcopy(teacher.model.text)
    elif backend == "text":
        text = _text_teacher_tower(teacher)
    elif backend == "openclip":
        text = _open_clip_teacher_tower(teacher)
    else:
        raise _refuse(f"teacher backend {backend or '?'!r}: pairing supports this library's saved teachers "
                      "(folder), text: teachers and openclip: teachers")
    if text.embed_dim != student.embed_dim:
        raise _refuse(f"teacher text dim {text.embed_dim} != student embed_dim {student.embed_dim}")
    pair = Student(copy.deepcopy(student.image), text, student.embed_dim)
    pair.teacher_identity = student.teacher_identity or teacher.identity
    pair.provenance = {**(student.provenance or {}), "text_tower": f"the teacher's own ({teacher.name}), paired at export"}
    _check_text(pair, teacher)
    return pair


@torch.no_grad()
def _check_text(pair: Student, teacher: Any) -> None:
    """The paired text tower must embed as the teacher does: anything else is refused, not shipped."""
    probe = ["a photo of a dog", "two children playing football on the beach at sunset, seen from far away"]
    got = pair.eval().encode_text(probe)
    want = teacher.encode_text(probe).to(got.device, got.dtype)
    if not torch.allclose(got, want, atol=1e-5):
        raise _refuse(f"pairing with {teacher.name!r} changes its text embeddings (max difference "
                      f"{float((got - want).abs().max()):.2e}); this teacher's text tower cannot be kept exactly")
