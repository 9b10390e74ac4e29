"""Evaluation: zero-shot classification, image-text retrieval, fidelity and speed.

Models are anything with ``encode_image(pixels)`` / ``encode_text(list[str])`` returning
normalised embeddings and an ``image_transform`` (teachers and students both qualify).
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import open_image


@torch.no_grad()
def embed_images(model: Any, paths: Sequence[str], batch_size: int = 64, encoder: Any = None) -> torch.Tensor:
    """Normalised image embeddings of ``paths`` with ``model``'s eval preprocessing."""
    transform = model.image_transform
    encode = encoder or model.encode_image
    out = []
    for i in range(0, len(paths), batch_size):
        pixels = torch.stack([transform(open_image(p)) for p in paths[i:i + batch_size]])
        out.append(encode(pixels).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def embed_texts(model: Any, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
    out = [model.encode_text(list(texts[i:i + batch_size])).float().cpu() for i in range(0, len(texts), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


def zero_shot_accuracy(image_emb: torch.Tensor, labels: Sequence[int], class_emb: torch.Tensor,
                       topk: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Top-k accuracy of nearest class embedding (class_emb rows: one per class, normalised)."""
    logits = F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()
    labels_t = torch.as_tensor(list(labels)).view(-1, 1)
    ranked = logits.topk(min(max(topk), logits.shape[1]), dim=-1).indices
    return {f"top{k}": float((ranked[:, :k] == labels_t).any(-1).float().mean()) for k in topk}


def class_embeddings(model: Any, classes: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
    """Per-class text embedding: mean of normalised prompt embeddings, renormalised (CLIP practice)."""
    rows = []
    for c in classes:
        e = embed_texts(model, [t.format(c) for t in templates])
        rows.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(rows)


def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, pairs: Sequence[tuple[int, int]],
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k both ways. ``pairs``: (image index, text index) of every matching pair; an image
    (text) counts as found at k when any matching text (image) is among its top k."""
    sim = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()
    rel = torch.zeros_like(sim, dtype=torch.bool)
    for i, j in pairs:
        rel[i, j] = True
    out = {}
    for name, s, r in (("i2t", sim, rel), ("t2i", sim.t(), rel.t())):
        has = r.any(-1)
        order = s.argsort(dim=-1, descending=True)
        hits = torch.gather(r, 1, order)
        for k in ks:
            k_ = min(k, s.shape[1])
            out[f"{name}_r{k}"] = float(hits[has, :k_].any(-1).float().mean()) if has.any() else 0.0
    return out


def fidelity(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    """Mean cosine between student and teacher embeddings of the same inputs."""
    return float(F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=-1).mean())


def count_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def images_per_second(encode, image_size: int, batch_size: int = 64, iters: int = 5, device: str = "cpu") -> float:
    """Throughput of ``encode`` on random pixels (after one warm-up batch)."""
    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    encode(x)
    if device != "cpu":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(iters):
        encode(x)
    if device != "cpu":
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - tic)
