"""Evaluation of a student against its teacher: zero-shot classification, image-text retrieval,
fidelity (cosine and nearest-neighbour overlap) and cost (parameters, MACs, latency, throughput).

Models are anything with ``encode_image(pixels)`` / ``encode_text(list[str])`` returning
normalised embeddings and an ``image_transform`` (teachers and students both qualify).
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from .data import open_image

log = logging.getLogger(__name__)


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
    """Normalised text embeddings of ``texts`` in their order (encoded in batches of similar length:
    less padding)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = [model.encode_text([texts[j] for j in order[i:i + batch_size]]).float().cpu()
           for i in range(0, len(order), batch_size)]
    if not out:
        return torch.empty(0)
    emb = torch.cat(out)
    return emb[torch.argsort(torch.tensor(order))]


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


def caption_retrieval(text_emb: torch.Tensor, groups: Sequence[Any], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Caption-to-caption Recall@k: each caption queries all the others (itself excluded); the
    relevant ones share its group (e.g. the other captions of the same photo)."""
    emb = F.normalize(text_emb.float(), dim=-1)
    codes = {g: i for i, g in enumerate(dict.fromkeys(groups))}
    g = torch.tensor([codes[x] for x in groups])
    hits = {k: 0 for k in ks}
    counted = 0
    for start in range(0, len(emb), 1024):  # blocks keep memory at 1024 x N
        sim = emb[start:start + 1024] @ emb.t()
        idx = torch.arange(start, start + len(sim))
        sim[torch.arange(len(sim)), idx] = float("-inf")
        rel = g[start:start + len(sim), None] == g[None, :]
        rel[torch.arange(len(sim)), idx] = False
        has = rel.any(-1)
        top = sim.topk(min(max(ks), len(emb) - 1), dim=-1).indices  # a small set has fewer others than k
        found = torch.gather(rel, 1, top)
        for k in ks:
            hits[k] += int(found[has, :k].any(-1).sum())
        counted += int(has.sum())
    return {f"r{k}": hits[k] / max(counted, 1) for k in ks}


def cross_lingual_recall(query_emb: torch.Tensor, query_groups: Sequence[Any], gallery_emb: torch.Tensor,
                         gallery_groups: Sequence[Any], ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """Recall@k of queries (captions in one language) against a gallery (captions in another): a hit
    when one of the top k gallery captions belongs to the query's group (the same photo)."""
    q = F.normalize(query_emb.float(), dim=-1)
    g = F.normalize(gallery_emb.float(), dim=-1)
    codes = {x: i for i, x in enumerate(dict.fromkeys([*gallery_groups, *query_groups]))}
    gg = torch.tensor([codes[x] for x in gallery_groups])
    qg = torch.tensor([codes[x] for x in query_groups])
    hits, counted = {k: 0 for k in ks}, 0
    has = torch.isin(qg, gg)
    for start in range(0, len(q), 1024):
        sim = q[start:start + 1024] @ g.t()
        top = sim.topk(min(max(ks), len(g)), dim=-1).indices
        found = gg[top] == qg[start:start + 1024, None]
        keep = has[start:start + 1024]
        for k in ks:
            hits[k] += int(found[keep, :k].any(-1).sum())
        counted += int(keep.sum())
    return {f"r{k}": hits[k] / max(counted, 1) for k in ks}


def caption_pairs(rows) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Unique images, unique captions, and the (image, caption) index pairs of ``rows``."""
    images = list(dict.fromkeys(i for i in rows.images if i))
    texts = list(dict.fromkeys(c for c in rows.captions if c))
    pi, pt = {p: i for i, p in enumerate(images)}, {c: j for j, c in enumerate(texts)}
    return images, texts, [(pi[i], pt[c]) for i, c in zip(rows.images, rows.captions) if i and c]


def fidelity(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> float:
    """Mean cosine between student and teacher embeddings of the same inputs."""
    return float(F.cosine_similarity(student_emb.float(), teacher_emb.float(), dim=-1).mean())


def count_params(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@torch.no_grad()
def images_per_second(encode, image_size: int, batch_size: int = 64, iters: int = 5, device: str = "cpu") -> float:
    """Throughput of ``encode`` on random pixels: the median of ``iters`` timed batches after two warm-up ones."""
    from .timing import seconds_per_call

    x = torch.randn(batch_size, 3, image_size, image_size, device=device)
    return batch_size / seconds_per_call(lambda: encode(x), warmup=2, repeat=iters, device=device)


def zero_shot_per_class(image_emb: torch.Tensor, labels: Sequence[int], class_emb: torch.Tensor) -> list[float]:
    """Top-1 accuracy of each class (NaN for classes with no image)."""
    pred = (F.normalize(image_emb.float(), dim=-1) @ F.normalize(class_emb.float(), dim=-1).t()).argmax(-1)
    labels_t = torch.as_tensor(list(labels))
    out = []
    for c in range(class_emb.shape[0]):
        m = labels_t == c
        out.append(float((pred[m] == c).float().mean()) if m.any() else float("nan"))
    return out


def knn_overlap(student_emb: torch.Tensor, teacher_emb: torch.Tensor, k: int = 10) -> float:
    """Mean fraction of each item's k nearest neighbours (itself excluded) that student and teacher share."""
    n = len(student_emb)
    if n < 2:
        return float("nan")
    k = min(k, n - 1)

    def neighbours(x):
        x = F.normalize(x.float(), dim=-1)
        sim = x @ x.t()
        sim.fill_diagonal_(-float("inf"))
        return sim.topk(k, dim=-1).indices

    a, b = neighbours(student_emb), neighbours(teacher_emb)
    shared = [len(set(a[i].tolist()) & set(b[i].tolist())) / k for i in range(n)]
    return sum(shared) / n


def macs(fn, *inputs) -> int:
    """Multiply-accumulates of one call, counted with torch's own FLOP counter (FLOPs / 2)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return int(counter.get_total_flops() // 2)


@torch.no_grad()
def image_costs(models: dict[str, Any], device: str = "cpu", rounds: int = 7) -> dict[str, dict[str, float | None]]:
    """Per model: MACs per image, batch-1 latency (ms) and batch-64 throughput of ``encode_image``, each the
    median of ``rounds`` timings after warm-up, the models timed alternately (``timing.compare``) so that
    they are compared under the same machine load; peak GPU memory of a batch of 64."""
    from .timing import compare

    out: dict[str, dict[str, float | None]] = {}
    one, batch = {}, {}
    for name, model in models.items():
        size = model.preprocess.image_size
        x1, x64 = torch.randn(1, 3, size, size, device=device), torch.randn(64, 3, size, size, device=device)
        out[name] = {"macs_image": macs(model.encode_image, x1), "peak_mem_mb": None}
        if device != "cpu":
            torch.cuda.reset_peak_memory_stats()
            model.encode_image(x64)
            out[name]["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        one[name] = lambda m=model, x=x1: m.encode_image(x)
        batch[name] = lambda m=model, x=x64: m.encode_image(x)
    for name, s in compare(one, rounds=rounds, device=device).items():
        out[name]["latency_ms_b1"] = 1000 * s
    for name, s in compare(batch, rounds=max(3, rounds // 2), device=device).items():
        out[name]["images_per_s"] = 64 / s
    return out


def evaluate_pair(teacher: Any, student: Any, captions: Any = None, classes: Any = None,
                  templates: Sequence[str] | None = None, device: str = "cpu",
                  queries: dict[str, Any] | None = None) -> dict[str, Any]:
    """Teacher and student side by side.

    Args:
        captions: Rows of image-caption pairs (retrieval, fidelity).
        classes: Rows with labels/classes (zero-shot top-1/top-5 and per-class accuracy).
        templates: prompt templates (default: the 80 CLIP ImageNet ones).
        queries: ``{name: Rows}`` of captions in other languages of the same photos as ``captions``:
            cross-lingual caption retrieval against ``captions`` (and text-to-image with the queries
            when the teacher has an image tower), as ``<name>_r1`` / ``<name>_t2i_r1`` ...

    Returns ``{"teacher": {...}, "student": {...}, "per_class": {...}, "cosines": [...]}``. A student
    without a text (image) tower is scored with the teacher's text (image) tower, as it is deployed.
    """
    from .templates import IMAGENET_TEMPLATES

    templates = tuple(templates or IMAGENET_TEMPLATES)
    s_has_img, s_has_txt = student.has_image, student.has_text
    res: dict[str, Any] = {"teacher": {}, "student": {}, "per_class": {}, "cosines": []}
    timed = {}
    for name, model in (("teacher", teacher), ("student", student)):
        r = res[name]
        r["params_image"], r["params_text"] = model.num_params("image"), model.num_params("text")
        if (name == "teacher" or s_has_img) and getattr(model, "preprocess", None) is not None:
            timed[name] = model
    for name, cost in image_costs(timed, device).items():  # timed side by side: the ratio is what matters
        res[name].update(cost)
    t_has_img = getattr(teacher, "has_image", True)
    if captions is not None and len(captions) and not t_has_img:  # a text-only teacher: captions alone
        texts = list(dict.fromkeys(c for c in captions.captions if c))
        t_txt = embed_texts(teacher, texts)
        s_txt = embed_texts(student, texts) if s_has_txt else t_txt
        res["student"]["fidelity"] = fidelity(s_txt, t_txt)
        res["student"]["knn10_overlap"] = knn_overlap(s_txt, t_txt)
        res["cosines"] = F.cosine_similarity(s_txt, t_txt, dim=-1).tolist()
    elif captions is not None and len(captions):
        images, texts, pairs = caption_pairs(captions)
        t_img, t_txt = embed_images(teacher, images), embed_texts(teacher, texts)
        s_img = embed_images(student, images) if s_has_img else t_img
        s_txt = embed_texts(student, texts) if s_has_txt else t_txt
        res["teacher"].update(retrieval_recall(t_img, t_txt, pairs))
        res["student"].update(retrieval_recall(s_img, s_txt, pairs))
        s_main, t_main = (s_img, t_img) if s_has_img else (s_txt, t_txt)
        res["student"]["fidelity"] = fidelity(s_main, t_main)
        res["student"]["knn10_overlap"] = knn_overlap(s_main, t_main)
        res["cosines"] = F.cosine_similarity(s_main, t_main, dim=-1).tolist()
        if s_has_img and s_has_txt:
            res["student"]["fidelity_text"] = fidelity(s_txt, t_txt)
    if classes is not None and classes.labels:
        t_cls = class_embeddings(teacher, classes.classes, templates)
        s_cls = class_embeddings(student, classes.classes, templates) if s_has_txt else t_cls
        t_img = embed_images(teacher, classes.images)
        s_img = embed_images(student, classes.images) if s_has_img else t_img
        for name, img, cls in (("teacher", t_img, t_cls), ("student", s_img, s_cls)):
            acc = zero_shot_accuracy(img, classes.labels, cls, topk=(1, 5))
            res[name]["zero_shot_top1"], res[name]["zero_shot_top5"] = acc["top1"], acc["top5"]
        per_t = zero_shot_per_class(t_img, classes.labels, t_cls)
        per_s = zero_shot_per_class(s_img, classes.labels, s_cls)
        res["per_class"] = {c: {"teacher": a, "student": b} for c, a, b in zip(classes.classes, per_t, per_s)}
        if captions is None:
            res["student"]["fidelity"] = fidelity(s_img, t_img)
            res["student"]["knn10_overlap"] = knn_overlap(s_img, t_img)
            res["cosines"] = F.cosine_similarity(s_img, t_img, dim=-1).tolist()
    for lang, q in (queries or {}).items():
        res_q = cross_lingual(teacher, student, q, captions, s_has_img, s_has_txt)
        for name in ("teacher", "student"):
            res[name].update({f"{lang}_{k}": v for k, v in res_q[name].items()})
    unk_sets = {"unk_share": captions, **{f"{lang}_unk_share": q for lang, q in (queries or {}).items()}}
    for key, rows in unk_sets.items():
        share = text_unk_share(student, [c for c in rows.captions if c]) if s_has_txt and rows is not None else None
        if share is not None:
            res["student"][key] = share
    return res


def text_unk_share(model: Any, texts: Sequence[str]) -> float | None:
    """Share of the tokens of ``texts`` the model's text tower reads as [UNK] (None: its tokenizer has no
    [UNK]); above 1% it warns: a trimmed or foreign vocabulary reads those captions blind."""
    tok = getattr(getattr(model, "text", None), "tokenizer", None)
    if getattr(tok, "unk_token_id", None) is None or not texts:
        return None
    from .vocab import unk_share

    share = unk_share(tok, texts)
    if share > 0.01:
        log.warning("%.1f%% of the tokens of %d captions are [UNK] for the student's tokenizer (a trimmed vocabulary, "
                    "or another language's text): those words read as nothing", 100 * share, len(texts))
    return share


def photo_keys(paths: Sequence[str]) -> dict[str, str]:
    """Each photo's content key (the cache's: a hash of its bytes), so a photo is the same photo in a
    copied folder or under another name."""
    from .cache.keys import image_keys

    unique = list(dict.fromkeys(paths))
    keys, _ = image_keys(unique, progress=False)
    return dict(zip(unique, keys))


def cross_lingual(teacher: Any, student: Any, queries: Any, gallery: Any, s_has_img: bool = False,
                  s_has_txt: bool = True) -> dict[str, dict[str, float]]:
    """Captions in another language (``queries``, image-caption rows) against the captions of the same
    photos in ``gallery``: caption->caption R@1/R@5 for teacher and student, and text->image R@1/R@5
    when the teacher has an image tower (a student without one is scored with the teacher's images)."""
    if gallery is None or not len(gallery):
        from .errors import RecipeError

        raise RecipeError("--queries: cross-lingual retrieval needs the gallery captions (--data)")
    q = [(i, c) for i, c in zip(queries.images, queries.captions) if i and c]
    g = [(i, c) for i, c in zip(gallery.images, gallery.captions) if i and c]
    key = photo_keys([i for i, _ in q + g])  # the same photo, however (and wherever) the two files name it
    out: dict[str, dict[str, float]] = {"teacher": {}, "student": {}}
    q_texts, g_texts = [c for _, c in q], [c for _, c in g]
    q_groups, g_groups = [key[i] for i, _ in q], [key[i] for i, _ in g]
    matched = sum(k in set(g_groups) for k in dict.fromkeys(q_groups))
    if not matched:
        from .errors import DataError

        raise DataError(f"{queries.source or 'the queries'}: none of its {len(set(q_groups))} photos is among the "
                        f"photos of {gallery.source or 'the gallery'} (compared by content): the queries must "
                        "caption the same photos as --data")
    if matched < len(set(q_groups)):
        import logging

        logging.getLogger(__name__).warning("%s: %d of its %d photos are not among the gallery's; their captions are "
                                            "left out", queries.source, len(set(q_groups)) - matched,
                                            len(set(q_groups)))
        q = [(i, c) for i, c in q if key[i] in set(g_groups)]
        q_texts, q_groups = [c for _, c in q], [key[i] for i, _ in q]
    for name in ("teacher", "student"):
        out[name]["queries_matched"] = len(q_texts)
    t_q, t_g = embed_texts(teacher, q_texts), embed_texts(teacher, g_texts)
    s_q = embed_texts(student, q_texts) if s_has_txt else t_q
    s_g = embed_texts(student, g_texts) if s_has_txt else t_g
    out["teacher"].update(cross_lingual_recall(t_q, q_groups, t_g, g_groups))
    out["student"].update(cross_lingual_recall(s_q, q_groups, s_g, g_groups))
    if getattr(teacher, "has_image", False):
        first: dict[str, str] = {}
        for i, _ in g:
            first.setdefault(key[i], i)
        photos = list(first.values())  # one path per photo
        t_img = embed_images(teacher, photos)
        s_img = embed_images(student, photos) if s_has_img else t_img
        groups = [key[p] for p in photos]
        for name, txt, img in (("teacher", t_q, t_img), ("student", s_q, s_img)):
            r = cross_lingual_recall(txt, q_groups, img, groups)
            out[name].update({f"t2i_{k}": v for k, v in r.items()})
    return out
