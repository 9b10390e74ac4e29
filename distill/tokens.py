"""Fewer tokens per step (CLIPA): image patch masks and resizing, text token selection, staged runs.

A recipe's ``train.schedule`` lists stages (``steps``, ``image_tokens``, ``text_tokens``); the training
step asks ``stage_at`` which one it is in and feeds the student fewer tokens through ``image_features``
and ``text_features``. Targets do not change: with a cache the teacher's embedding stays that of the
full view, so the student learns to predict it from fewer tokens (masked distillation).

Image modes: ``resize`` (any student; ViTs interpolate their position embeddings), ``random`` (patch
dropout), ``grid`` (one patch of every 2x2 window), ``block`` (one contiguous rectangle of patches); the
masks need a ViT student (timm ``VisionTransformer``), prefix tokens (class, registers) are always kept.
Text modes keep ``keep`` tokens of each caption plus its special tokens, in their order: ``truncate``
(the first ones), ``random``, ``block`` (contiguous) and ``syntax`` (nouns, then adjectives, then verbs,
then the rest: open_clip's order) with a part-of-speech tagger from ``TAGGERS``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from .config.schema import IMAGE_MODES, TEXT_MODES  # noqa: F401  (the recipe's vocabulary, importable here)
from .errors import RecipeError
from .registry import Registry



# -- stages ------------------------------------------------------------------------------------------
def stage_at(schedule: Sequence[Any], step: int) -> tuple[int, Any | None]:
    """(index, stage) of optimiser step ``step`` (0-based); (0, None) without a schedule. The last stage
    runs to the end of the run."""
    if not schedule:
        return 0, None
    end = 0
    for i, stage in enumerate(schedule[:-1]):
        end += stage.steps
        if step < end:
            return i, stage
    return len(schedule) - 1, schedule[-1]


def describe(stage: Any | None) -> str:
    """``image random 0.5, text syntax 8`` / ``full``: what a stage feeds the student."""
    parts = []
    for tower in ("image", "text"):
        cfg = getattr(stage, f"{tower}_tokens", None)
        if cfg is not None and cfg.mode:
            parts.append(f"{tower} {cfg.mode} " + (f"{cfg.size}px" if cfg.size else f"{cfg.keep:g}"))
    return ", ".join(parts) or "full"


def step_generator(seed: int, step: int) -> torch.Generator:
    """The masks of step ``step``: the same after a resume, on every process."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def check_schedule(model: Any, schedule: Sequence[Any]) -> None:
    """Every stage must be one ``model`` can run: image modes need an image tower (patch masks a ViT), text
    modes a text tower. Checked before the first step, so a later stage cannot fail after hours."""
    for i, stage in enumerate(schedule):
        at = f"train.schedule[{i}]"
        img, txt = stage.image_tokens, stage.text_tokens
        image = getattr(model, "image", None)
        if img.mode and image is None:
            raise RecipeError(f"{at}.image_tokens.mode: {img.mode} reduces image tokens, and this model has no image "
                              "tower")
        if img.mode in ("random", "grid", "block") and _timm_vit(getattr(image, "trunk", None)) is None:
            kind = type(getattr(image, "trunk", image)).__name__
            raise RecipeError(f"{at}.image_tokens.mode: {img.mode} drops patch tokens, which needs a ViT student ({kind} "
                              "is not one); convolutional students support mode: resize only")
        if txt.mode and getattr(model, "text", None) is None:
            raise RecipeError(f"{at}.text_tokens.mode: {txt.mode} reduces text tokens, and this model has no text "
                              "tower")


# -- images ------------------------------------------------------------------------------------------
def patch_indices(mode: str, grid: tuple[int, int], keep: float, batch: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """[batch, K] indices (row-major, ascending) of the patches each image keeps out of ``grid``."""
    h, w = grid
    n = h * w
    if mode == "random":
        k = max(1, min(n, round(keep * n)))
        noise = torch.rand(batch, n, generator=generator)
        return noise.argsort(dim=1)[:, :k].sort(dim=1).values
    if mode == "grid":  # one offset per image, the same in every 2x2 window: a regular sub-grid
        if h < 2 or w < 2:
            raise RecipeError(f"image_tokens.mode: grid needs at least 2x2 patches; this student has {h}x{w}")
        off = torch.randint(0, 2, (batch, 2), generator=generator)  # (an odd grid's last row/column: never kept)
        rows = off[:, :1] + 2 * torch.arange(h // 2)  # [B, h/2]
        cols = off[:, 1:] + 2 * torch.arange(w // 2)  # [B, w/2]
        return (rows[:, :, None] * w + cols[:, None, :]).flatten(1)
    if mode == "block":
        bh = max(1, min(h, round(h * math.sqrt(keep))))
        bw = max(1, min(w, round(keep * n / bh)))
        top = torch.randint(0, h - bh + 1, (batch,), generator=generator)
        left = torch.randint(0, w - bw + 1, (batch,), generator=generator)
        r, c = torch.arange(bh), torch.arange(bw)
        return ((top[:, None, None] + r[None, :, None]) * w + left[:, None, None] + c[None, None, :]).flatten(1)
    raise RecipeError(f"image_tokens.mode: {mode!r} is not one of {', '.join(IMAGE_MODES)}")


def resized_side(size: int, cfg: Any, multiple: int = 1) -> int:
    """The side a ``resize`` stage trains at: ``cfg.size`` pixels, or the side keeping ``cfg.keep`` of the
    tokens (``size * sqrt(keep)``), a multiple of ``multiple`` (a ViT's patch)."""
    side = cfg.size or size * math.sqrt(cfg.keep)
    return max(multiple, int(round(side / multiple)) * multiple)


def _timm_vit(trunk: Any):
    try:
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    return trunk if isinstance(trunk, VisionTransformer) else None


class _KeepPatches(torch.nn.Module):
    """Stands in for a timm ViT's ``patch_drop``: keeps the prefix tokens and the chosen patches."""

    def __init__(self, prefix: int, indices: torch.Tensor):
        super().__init__()
        self.prefix, self.indices = prefix, indices

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idx = self.indices.to(x.device)[..., None].expand(-1, -1, x.shape[-1]) + self.prefix
        return torch.cat([x[:, :self.prefix], x.gather(1, idx)], dim=1)


@contextmanager
def _swap(obj: Any, **attrs: Any) -> Iterator[None]:
    old = {k: getattr(obj, k) for k in attrs}
    for k, v in attrs.items():
        setattr(obj, k, v)
    try:
        yield
    finally:
        for k, v in old.items():
            setattr(obj, k, v)


@contextmanager
def _any_size(vit: Any) -> Iterator[None]:
    """A timm ViT taking another image size for a while: position embeddings interpolated per call."""
    from timm.layers import Format

    pe = vit.patch_embed
    with _swap(vit, dynamic_img_size=True), _swap(pe, strict_img_size=False, flatten=False, output_fmt=Format.NHWC):
        yield


def image_features(model: Any, pixels: torch.Tensor, cfg: Any | None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``model.image_features(pixels)`` with the stage's image tokens (``cfg``: mode, keep, size)."""
    if cfg is None or not cfg.mode:
        return model.image_features(pixels)
    trunk = model.image.trunk if hasattr(model.image, "trunk") else None
    vit = _timm_vit(trunk)
    if cfg.mode == "resize":
        multiple = vit.patch_embed.patch_size[0] if vit is not None else 1
        side = resized_side(pixels.shape[-1], cfg, multiple)
        if side != pixels.shape[-1]:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        if vit is None or side == vit.patch_embed.img_size[0]:
            return model.image_features(pixels)
        with _any_size(vit):
            return model.image_features(pixels)
    if vit is None:
        kind = type(trunk).__name__ if trunk is not None else type(model.image).__name__
        raise RecipeError(f"image_tokens.mode: {cfg.mode} drops patch tokens, which needs a ViT student ({kind} is "
                          "not one); convolutional students support mode: resize only")
    indices = patch_indices(cfg.mode, tuple(vit.patch_embed.grid_size), cfg.keep or 0.25, pixels.shape[0], generator)
    with _swap(vit, patch_drop=_KeepPatches(vit.num_prefix_tokens, indices)):
        return model.image_features(pixels)


# -- text --------------------------------------------------------------------------------------------
def special_ids(tokenizer: Any) -> list[int]:
    """Ids a text mask always keeps: the tokenizer's special tokens (HF ``all_special_ids``; open_clip's
    start/end of text)."""
    ids = list(getattr(tokenizer, "all_special_ids", None) or [])
    for name in ("sot_token_id", "eot_token_id"):
        if getattr(tokenizer, name, None) is not None:
            ids.append(int(getattr(tokenizer, name)))
    return ids


def select_tokens(tokens: dict[str, torch.Tensor], specials: Sequence[int], mode: str, keep: int,
                  generator: torch.Generator | None = None, priority: torch.Tensor | None = None,
                  pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Keep ``keep`` content tokens of each row (special tokens always, order kept); the rows come back
    padded to the longest. ``priority`` [B, T] (smaller first) ranks tokens for ``syntax``."""
    ids, mask = tokens["input_ids"], tokens.get("attention_mask")
    if mask is None:
        mask = (ids != pad_id).long()
    special = torch.isin(ids, torch.tensor(list(specials), dtype=ids.dtype)) & (mask > 0)
    content = (mask > 0) & ~special
    rows = []
    for b in range(ids.shape[0]):
        pos = content[b].nonzero().flatten()
        n = len(pos)
        k = min(keep, n)
        if k == n:
            chosen = pos
        elif mode == "truncate":
            chosen = pos[:k]
        elif mode == "random":
            chosen = pos[torch.randperm(n, generator=generator)[:k].sort().values]
        elif mode == "block":
            start = int(torch.randint(0, n - k + 1, (1,), generator=generator))
            chosen = pos[start:start + k]
        elif mode == "syntax":
            if priority is None:
                raise RecipeError("text_tokens.mode: syntax needs each token's part of speech (a tagger)")
            rank = priority[b, pos].double() + torch.arange(n, dtype=torch.float64) / (n + 1)  # stable: by class, then order
            chosen = pos[rank.argsort()[:k].sort().values]
        else:
            raise RecipeError(f"text_tokens.mode: {mode!r} is not one of {', '.join(TEXT_MODES)}")
        rows.append(torch.cat([special[b].nonzero().flatten(), chosen]).sort().values)
    length = max(len(r) for r in rows)
    out = {}
    for key, value in tokens.items():
        fill = pad_id if key == "input_ids" else 0
        new = value.new_full((value.shape[0], length), fill)
        for b, r in enumerate(rows):
            new[b, :len(r)] = value[b, r]
        out[key] = new
    if "attention_mask" not in out:
        out["attention_mask"] = torch.zeros(ids.shape[0], length, dtype=torch.long)
        for b, r in enumerate(rows):
            out["attention_mask"][b, :len(r)] = 1
    return out


def text_features(model: Any, tokens: dict[str, torch.Tensor], cfg: Any | None,
                  generator: torch.Generator | None = None, priority: torch.Tensor | None = None) -> torch.Tensor:
    """``model.text_features(tokens)`` with the stage's text tokens (``cfg``: mode, keep)."""
    if cfg is None or not cfg.mode:
        return model.text_features(tokens)
    tok = model.text.tokenizer
    pad = getattr(tok, "pad_token_id", None) or getattr(model.text, "pad_id", 0) or 0
    return model.text_features(select_tokens(tokens, special_ids(tok), cfg.mode, int(cfg.keep), generator,
                                             priority, pad))


# -- parts of speech ----------------------------------------------------------------------------------
TAGGERS = Registry("tagger")
WORD_CLASSES = (("NN", 0), ("JJ", 1), ("VB", 2))  # Penn tags: nouns, adjectives, verbs, then the rest


def _missing(what: str, install: str) -> RecipeError:
    return RecipeError(f"text_tokens.tagger: the syntax mask needs a part-of-speech tagger and {what}; {install}, "
                       "or choose another with text_tokens.tagger (nltk | textblob | spacy:<pipeline>)")


@TAGGERS.register()
def nltk() -> Callable[[list[str]], list[str]]:
    """NLTK's averaged perceptron tagger (open_clip's choice); needs its data installed."""
    try:
        import nltk as _nltk
    except ImportError:
        raise _missing("NLTK is not installed", "pip install nltk && python -m nltk.downloader "
                       "averaged_perceptron_tagger_eng") from None
    try:
        _nltk.pos_tag(["a", "dog"])
    except LookupError:
        raise _missing("NLTK's tagger data is not installed",
                       "run python -m nltk.downloader averaged_perceptron_tagger_eng") from None
    return lambda words: [t for _, t in _nltk.pos_tag(words)]


@TAGGERS.register()
def textblob() -> Callable[[list[str]], list[str]]:
    """TextBlob's pattern tagger: a Brill lexicon shipped inside the package, works offline."""
    try:
        from textblob.en.taggers import PatternTagger
    except ImportError:
        raise _missing("TextBlob is not installed", "pip install 'clip-distill[syntax]' (TextBlob, offline)") from None
    tagger = PatternTagger()
    # tokenize=False: one tag per word we pass (pattern splits on spaces)
    return lambda words: [t for _, t in tagger.tag(" ".join(w.replace(" ", "_") for w in words), tokenize=False)]


def _spacy(pipeline: str) -> Callable[[list[str]], list[str]]:
    try:
        import spacy
        from spacy.tokens import Doc
    except ImportError:
        raise _missing("spaCy is not installed", f"pip install spacy && python -m spacy download {pipeline}") from None
    try:
        nlp = spacy.load(pipeline, disable=["parser", "ner", "lemmatizer"])
    except OSError:
        raise _missing(f"spaCy's pipeline {pipeline} is not installed", f"python -m spacy download {pipeline}") from None
    return lambda words: [t.tag_ for t in nlp(Doc(nlp.vocab, words=words))]


_TAGGER_CACHE: dict[str, Callable[[list[str]], list[str]]] = {}


def get_tagger(name: str) -> Callable[[list[str]], list[str]]:
    """A tagger ``words -> Penn tags`` by name: ``nltk``, ``textblob``, ``spacy:<pipeline>`` or one
    registered with ``@TAGGERS.register()``."""
    if name not in _TAGGER_CACHE:
        if name.startswith("spacy:"):
            _TAGGER_CACHE[name] = _spacy(name.split(":", 1)[1] or "en_core_web_sm")
        else:
            if name not in TAGGERS:
                raise RecipeError(f"text_tokens.tagger: {name!r} is not one of {', '.join(TAGGERS.list())}, "
                                  "spacy:<pipeline>")
            _TAGGER_CACHE[name] = TAGGERS.create(name)
    return _TAGGER_CACHE[name]


def word_class(tag: str) -> int:
    return next((rank for prefix, rank in WORD_CLASSES if tag.startswith(prefix)), len(WORD_CLASSES))


def syntax_priority(tokenizer: Any, texts: Sequence[str], tokens: dict[str, torch.Tensor],
                    tagger: Callable[[list[str]], list[str]]) -> torch.Tensor:
    """[B, T] word class of each token of ``tokens`` (the tokenizer's output for ``texts``): its word's
    part of speech (0 nouns, 1 adjectives, 2 verbs, 3 the rest); special and padding tokens get 3."""
    if not getattr(tokenizer, "is_fast", False):
        raise RecipeError("text_tokens.mode: syntax maps words to tokens with a Hugging Face fast tokenizer; this "
                          f"student's tokenizer ({type(tokenizer).__name__}) is not one: use truncate, random or block")
    ids = tokens["input_ids"]
    out = torch.full(ids.shape, len(WORD_CLASSES), dtype=torch.long)
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=ids.shape[1])
    for b, text in enumerate(texts):
        word_ids = enc.word_ids(b)
        if not any(w is not None for w in word_ids):
            continue
        words = _words(tokenizer, text, enc, b, word_ids)
        ranks = [word_class(t) for t in tagger(words)] if words else []
        for j, w in enumerate(word_ids[:ids.shape[1]]):
            if w is not None and w < len(ranks):
                out[b, j] = ranks[w]
    return out


def _words(tokenizer: Any, text: str, enc: Any, b: int, word_ids: list[int | None]) -> list[str]:
    """The words the tokenizer split ``text`` into, in the numbering of ``word_ids``."""
    spans: dict[int, tuple[int, int]] = {}
    for j, w in enumerate(word_ids):
        if w is None:
            continue
        span = enc.token_to_chars(b, j)
        if span is None:
            continue
        lo, hi = spans.get(w, (span.start, span.end))
        spans[w] = (min(lo, span.start), max(hi, span.end))
    return [text[slice(*spans[w])] if w in spans else "" for w in range(max(spans) + 1)] if spans else []


def syntax_annotator(schedule: Sequence[Any], text_tower: Any) -> Callable[[list[str], Any], torch.Tensor] | None:
    """``(captions, tokens) -> word classes`` for a schedule that keeps text tokens by syntax (None
    otherwise), to run in the loader beside the tokenizer. The tagger (the first syntax stage's) loads
    now, so a missing one fails before training starts."""
    stages = [s.text_tokens for s in schedule if s.text_tokens.mode == "syntax"]
    if not stages or text_tower is None:
        return None
    tagger = get_tagger(stages[0].tagger)
    tokenizer = text_tower.tokenizer
    return lambda texts, toks: syntax_priority(tokenizer, texts, toks, tagger)
