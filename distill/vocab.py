"""Tokenizers for the user's language, and growing a pretrained vocabulary without losing its English.

``train_tokenizer`` learns a WordPiece (BERT-compatible), BPE or Unigram vocabulary from captions with
Hugging Face ``tokenizers``: Unicode NFC or NFKC, no accent stripping ("Một người" stays "Một người"),
CJK characters split one per token, optional lowercasing. The result is a ``transformers`` fast
tokenizer folder (``tokenizer.json``): ``bert_small(tokenizer=DIR)`` builds a student on it, it is saved
with the student and every export format carries it.

``grow_vocab`` extends a pretrained WordPiece model (MiniLM's English uncased vocabulary) with the
new pieces of a trained tokenizer that its vocabulary spells only through stripped accents or [UNK]
(pieces with non-ASCII characters), initialising each new embedding as the mean of the embeddings of
the old pieces the pretrained tokenizer split it into. English text tokenizes exactly as before, so
the pretrained start keeps what it knows (multilingual knowledge distillation: Reimers & Gurevych, 2020).

A piece can start at what it means instead: ``align_pieces`` finds the English pieces it translates to in
parallel sentences (IBM Model 1), ``align_pieces_by_images`` the English words nearest the photos its
captions describe (a language with photos and no parallel text); ``set_piece_embeddings`` applies either.
"""
from __future__ import annotations

import os
from pathlib import Path
from collections import Counter
from typing import Any, Iterable, Sequence

from ._imports import require
from .errors import RecipeError

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MODELS = ("wordpiece", "bpe", "unigram")
MAX_VOCAB = 1 << 20


def train_tokenizer(texts: Iterable[str], vocab_size: int = 16000, model: str = "wordpiece",
                    normalization: str = "nfc", lowercase: bool = False, min_frequency: int = 2):
    """A fast tokenizer (``transformers.PreTrainedTokenizerFast``) trained on ``texts``."""
    tk = require("tokenizers", "training a tokenizer")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

    if model not in MODELS:
        raise RecipeError(f"--model: {model!r} is not one of {', '.join(MODELS)}")
    if normalization not in ("nfc", "nfkc"):
        raise RecipeError(f"--normalize: {normalization!r} is not nfc or nfkc")
    if vocab_size < len(SPECIALS) + 2:
        raise RecipeError(f"--vocab: {vocab_size} is too small")
    if vocab_size > MAX_VOCAB:  # tokenizers allocates for the asked size up front (and aborts the process)
        raise RecipeError(f"--vocab: {vocab_size} is over {MAX_VOCAB:,} tokens; BERT-sized models use 30,000-250,000")
    unicode = normalizers.NFC() if normalization == "nfc" else normalizers.NFKC()
    # BertNormalizer: control characters out, spaces around CJK characters (one token each), accents kept
    norm = normalizers.Sequence([unicode, normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase)])
    if model == "wordpiece":
        tok = tk.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS),
                                            min_frequency=min_frequency)
        tok.decoder = decoders.WordPiece()
    elif model == "bpe":
        tok = tk.Tokenizer(models.BPE(unk_token="[UNK]", continuing_subword_prefix="##"))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), min_frequency=min_frequency,
                                      continuing_subword_prefix="##")
        tok.decoder = decoders.WordPiece()
    else:
        tok = tk.Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), unk_token="[UNK]")
        tok.decoder = decoders.Metaspace()
    tok.normalizer = norm
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer() if model != "unigram" else pre_tokenizers.Sequence(
        [pre_tokenizers.BertPreTokenizer(), pre_tokenizers.Metaspace()])
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        from .errors import DataError

        raise DataError("no captions to train a tokenizer on")
    tok.train_from_iterator(texts, trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return _fast(tok)


def token_counts(tokenizer: Any, texts: Sequence[str], batch: int = 4096) -> Counter:
    """How often each token id occurs in ``texts`` (special tokens not counted)."""
    counts: Counter = Counter()
    for i in range(0, len(texts), batch):
        for ids in tokenizer(list(texts[i:i + batch]), add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def unk_share(tokenizer: Any, texts: Sequence[str]) -> float:
    """Share of the tokens of ``texts`` that are [UNK]."""
    counts = token_counts(tokenizer, texts)
    total = sum(counts.values())
    return counts.get(tokenizer.unk_token_id, 0) / total if total else 0.0


def _fast(tok):
    transformers = require("transformers", "tokenizers")
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                                cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def load_tokenizer(folder: str | os.PathLike):
    """A tokenizer folder (``distill tokenizer train`` or any transformers tokenizer)."""
    from .errors import MissingFileError

    folder = Path(folder)
    if not (folder / "tokenizer.json").exists() and not (folder / "vocab.txt").exists():
        raise MissingFileError(f"{folder}: no tokenizer.json or vocab.txt; train one with `distill tokenizer train`")
    transformers = require("transformers", "tokenizers")
    return transformers.AutoTokenizer.from_pretrained(str(folder))


def new_pieces(base, trained, lowercase: bool = False) -> list[str]:
    """Pieces of ``trained`` that ``base`` lacks and can only spell through stripped accents or [UNK]
    (they hold a non-ASCII character), in WordPiece's convention (``##`` marks a piece inside a word):
    adding just these leaves ASCII text tokenized as before. Unigram / SentencePiece vocabularies (``▁``
    marks a word's start) are converted, and every non-ASCII character of ``trained`` is added as a word
    start and as a continuation, so any word of its alphabet can be spelled without [UNK].
    ``lowercase``: the base is uncased, so the pieces are lowercased (and merged) first."""
    import unicodedata

    vocab = trained.get_vocab()
    pieces = [p for p in sorted(vocab, key=vocab.get) if p not in SPECIALS]
    if any(p.startswith("Ġ") for p in pieces):
        raise RecipeError("student.kwargs.extend_vocab: a byte-level BPE vocabulary (GPT-2 style) cannot grow a "
                          "WordPiece one; train the tokenizer with `distill tokenizer train` (wordpiece, bpe or unigram)")
    metaspace = any(p.startswith("▁") for p in pieces)
    have = set(base.get_vocab())
    out: dict[str, None] = {}

    def add(piece: str) -> None:
        piece = unicodedata.normalize("NFC", piece.lower() if lowercase else piece)
        if piece not in ("", "##") and piece not in have and any(ord(ch) > 127 for ch in piece):
            out[piece] = None

    chars: dict[str, None] = {}
    for piece in pieces:
        if metaspace:  # "▁word" starts a word, any other piece continues one
            piece = piece[1:] if piece.startswith("▁") else "##" + piece
        add(piece)
        chars.update(dict.fromkeys(ch for ch in piece.removeprefix("##") if ord(ch) > 127))
    for ch in chars:
        add(ch)
        add("##" + ch)
    return list(out)


def grow_vocab(encoder: Any, base, trained, lowercase: bool | None = None,
               pairs: Sequence[tuple[str, str]] | None = None) -> tuple[Any, list[str]]:
    """Extend a pretrained WordPiece model with ``trained``'s non-ASCII pieces. Returns the new tokenizer
    (the base vocabulary followed by the new pieces; accents kept) and the pieces added. The encoder's
    input embeddings grow in place; each new row is the mean of the old pieces ``base`` splits it into.
    Given parallel ``pairs`` (new-language sentence, sentence the base reads), every non-ASCII piece seen
    often enough there, new or the base's own, starts instead at the base pieces it translates to
    (``align_pieces``)."""
    import torch

    transformers = require("transformers", "tokenizers")
    vocab = base.get_vocab()
    if "[UNK]" not in vocab or not any(p.startswith("##") for p in vocab):
        raise RecipeError("student.kwargs.extend_vocab: the pretrained tokenizer is not a WordPiece one; train a "
                          "tokenizer for the student instead (student.kwargs.tokenizer)")
    lowercase = bool(getattr(base, "do_lower_case", True)) if lowercase is None else lowercase
    added = new_pieces(base, trained, lowercase)
    ordered = [p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])] + added
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.txt").write_text("".join(p + "\n" for p in ordered), encoding="utf-8")
        grown = transformers.BertTokenizerFast(str(Path(tmp) / "vocab.txt"), do_lower_case=lowercase,
                                               strip_accents=False, tokenize_chinese_chars=True)
    emb = encoder.get_input_embeddings().weight
    old = emb.detach().clone()
    encoder.resize_token_embeddings(len(ordered), mean_resizing=False)  # the new rows are set below
    weight = encoder.get_input_embeddings().weight
    with torch.no_grad():
        for k, piece in enumerate(added):
            ids = [i for i in base(piece.removeprefix("##"), add_special_tokens=False)["input_ids"]
                   if i != base.unk_token_id] or [base.unk_token_id]
            weight[len(vocab) + k] = old[ids].mean(0)
    if pairs:  # the base's own pieces in these scripts were hardly trained (MiniLM read English): them too
        set_piece_embeddings(encoder, align_pieces(grown, base, pairs, [i for p, i in grown.get_vocab().items()
                                                                         if not p.isascii()]))
    return grown, added


def align_pieces(tokenizer, base, pairs: Sequence[tuple[str, str]], pieces: Iterable[int], top: int = 8,
                 min_count: int = 3, iterations: int = 5,
                 max_pairs: int = 200_000) -> dict[int, tuple[list[int], list[float]]]:
    """For each token id in ``pieces`` (of ``tokenizer``, reading the first sentence of each pair) seen at least
    ``min_count`` times, the ``base`` token ids (reading the second) it translates to and their probabilities
    (the ``top`` most likely, summing to 1): IBM Model 1 word alignment (Brown et al., 1993) by EM over the
    sentence pairs (``max_pairs`` of them, evenly spread: memory grows with their words), with a null word. A
    piece whose embedding starts at what it means learns in a fraction of the steps one that starts at [UNK]
    does (cf. WECHSEL, Minixhofer et al., 2022)."""
    import numpy as np

    if len(pairs) > max_pairs:
        pairs = [pairs[int(k)] for k in np.linspace(0, len(pairs) - 1, max_pairs)]
    pieces = set(pieces)
    specials = set(base.all_special_ids) | set(tokenizer.all_special_ids)
    src_ids = tokenizer([a for a, _ in pairs], add_special_tokens=False)["input_ids"]
    tgt_ids = base([b for _, b in pairs], add_special_tokens=False)["input_ids"]
    null = len(tokenizer)  # a source word every target word may align to instead (function words, punctuation)
    f_all, e_all, pos_all = [], [], []
    pos = 0
    for src, tgt in zip(src_ids, tgt_ids):
        src = [i for i in src if i not in specials] + [null]
        tgt = [i for i in tgt if i not in specials]
        if len(src) < 2 or not tgt:
            continue
        f_all.append(np.tile(np.asarray(src, np.int64), len(tgt)))
        e_all.append(np.repeat(np.asarray(tgt, np.int64), len(src)))
        pos_all.append(np.repeat(np.arange(pos, pos + len(tgt)), len(src)))
        pos += len(tgt)
    if not f_all:
        return {}
    f, e, position = np.concatenate(f_all), np.concatenate(e_all), np.concatenate(pos_all)
    links, link = np.unique(f * (len(base) + 1) + e, return_inverse=True)
    link_f, link_e = links // (len(base) + 1), links % (len(base) + 1)
    t = np.ones(len(links))
    for _ in range(iterations):
        p = t[link]
        post = p / np.bincount(position, weights=p, minlength=pos)[position]
        counts = np.bincount(link, weights=post, minlength=len(links))
        t = counts / np.bincount(link_f, weights=counts)[link_f]
    seen = np.bincount(np.concatenate([np.asarray([i for i in s if i not in specials], np.int64)
                                       for s in src_ids] or [np.zeros(0, np.int64)]), minlength=null + 1)
    out: dict[int, tuple[list[int], list[float]]] = {}
    order = np.argsort(link_f, kind="stable")
    starts = np.searchsorted(link_f[order], np.arange(null + 2))
    for piece in pieces:
        if piece >= null or seen[piece] < min_count:
            continue
        rows = order[starts[piece]:starts[piece + 1]]
        if not len(rows):
            continue
        best = rows[np.argsort(-t[rows])[:top]]
        probs = t[best] / t[best].sum()
        out[int(piece)] = ([int(i) for i in link_e[best]], [float(x) for x in probs])
    return out


def texts_of(sources: Sequence[str], columns: Sequence[str] = ()) -> list[str]:
    """Every caption of the data sources (or the named columns of a table, e.g. a parallel CSV)."""
    from .data import load_rows, read_text_file

    out: list[str] = []
    for src in sources:
        if columns:
            import csv
            import io

            reader = csv.DictReader(io.StringIO(read_text_file(src)))
            missing = [c for c in columns if c not in (reader.fieldnames or [])]
            if missing:
                from .errors import DataError

                raise DataError(f"{src}: no column {missing[0]!r}; columns are {reader.fieldnames}")
            for r in reader:
                out += [r[c] for c in columns if r.get(c)]
        else:
            out += [c for c in load_rows(src).captions if c]
    return out


def align_pieces_by_images(tokenizer, captions: Sequence[str], image_emb: Any, embed_words: Any,
                           pieces: Iterable[int], top: int = 8, min_count: int = 3,
                           temperature: float = 0.02) -> dict[int, tuple[list[int], list[float]]]:
    """``align_pieces`` for a language with photos and no parallel text: the photos are the dictionary. Each
    piece in ``pieces`` (ids of ``tokenizer``, which reads ``captions``) seen in ``min_count`` captions or more
    is the mean of the embeddings (``image_emb``, one row per caption, in a teacher's joint space) of the photos
    its captions describe; each English word of the tokenizer's vocabulary (ASCII letters, whole words) is the
    teacher's embedding of that word alone (``embed_words``: a list of words -> their embeddings in the same
    space). Each side is centred (the gap between a joint space's image and text sides is not a meaning) and a
    piece goes to the ``top`` words nearest it, weighted by a softmax at ``temperature``."""
    import torch
    import torch.nn.functional as F

    ids = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    where: dict[int, list[int]] = {p: [] for p in pieces}
    for row, caption_ids in enumerate(ids):
        for p in set(caption_ids):
            if p in where:
                where[p].append(row)
    keys = [p for p, rows in where.items() if len(rows) >= min_count]
    vocab = tokenizer.get_vocab()
    words = [w for w in vocab if w.isascii() and w.isalpha() and len(w) > 1 and w not in SPECIALS]
    if not keys or not words:
        return {}
    images = F.normalize(torch.as_tensor(image_emb, dtype=torch.float32), dim=-1)
    piece_emb = torch.stack([images[where[p]].mean(0) for p in keys]) - images.mean(0)
    word_emb = F.normalize(torch.as_tensor(embed_words(words), dtype=torch.float32), dim=-1)
    sims = F.normalize(piece_emb, dim=-1) @ F.normalize(word_emb - word_emb.mean(0), dim=-1).T
    best, idx = sims.topk(min(top, len(words)), dim=-1)
    probs = torch.softmax(best / temperature, dim=-1)
    return {p: ([vocab[words[j]] for j in idx[k].tolist()], probs[k].tolist()) for k, p in enumerate(keys)}


def set_piece_embeddings(encoder: Any, aligned: dict[int, tuple[list[int], list[float]]]) -> int:
    """Start each aligned piece's input embedding at the weighted mean of the embeddings of the pieces it was
    aligned to (``align_pieces``, ``align_pieces_by_images``). Returns how many were set."""
    import torch

    weight = encoder.get_input_embeddings().weight
    old = weight.detach().clone()
    with torch.no_grad():
        for piece, (ids, probs) in aligned.items():
            weight[piece] = (old[ids] * torch.tensor(probs, dtype=old.dtype)[:, None]).sum(0)
    return len(aligned)
