"""Smaller text students from a pretrained encoder: a trimmed vocabulary and narrower blocks that inherit weights.

Half of MiniLM-L6 is its 30,522-row token table, and most of those tokens never occur in a user's captions.

* ``trim_vocab`` keeps the WordPiece tokens the user's text uses (and every single-character piece of ASCII and of
  the text's own alphabet, so any word of it can still be spelled), and takes their embedding rows. WordPiece
  matches the longest piece first, so a caption made of kept pieces tokenizes exactly as before: its embedding is
  unchanged until training.
* ``narrow`` builds a BERT encoder with a smaller FFN (``intermediate_size``) and/or a smaller hidden size (fewer
  attention heads of the same size), initialised from the teacher's most important neurons, heads and hidden
  dimensions (TinyCLIP's weight inheritance). Importance is measured by their effect on the encoder's output on
  the user's text (mean |activation| x the norm of the weights that carry it onward, as Wanda prunes): a neuron
  with large weights that never fires on these captions is worth nothing to this student, which weight magnitude
  alone cannot see. Without text it falls back to weight magnitude.

Both change only the encoder's config and weights: the student saves, loads and exports as any other.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..errors import DataError, RecipeError
from ..vocab import SPECIALS, token_counts, unk_share


def read_texts(source: str | os.PathLike | Sequence[str], key: str = "student.kwargs.trim_vocab") -> list[str]:
    """Texts of a source: a list of strings, a data source with captions (a .txt file: one per line), or a
    csv/tsv whose columns of sentences are all read (a parallel file: en, de, fr)."""
    from ..errors import DistillError
    from ..vocab import texts_of

    if not isinstance(source, (str, os.PathLike)):
        texts = [str(t) for t in source]
    else:
        path = Path(os.path.expanduser(str(source)))
        if not path.exists():
            raise DataError(f"{key}: {str(source)!r}: no such file or folder")
        try:
            texts = texts_of([str(path)])
        except DistillError:
            if path.suffix.lower() not in (".csv", ".tsv"):
                raise
            texts = []
        if not texts and path.suffix.lower() in (".csv", ".tsv"):  # no caption column: a parallel file
            from ..data.sources.parallel import sentence_columns

            try:
                texts = [t for col in sentence_columns(path).values() for t in col]
            except DataError as e:
                raise DataError(f"{key}: {e}") from None
    texts = [t.strip() for t in texts if t and t.strip()]
    if not texts:
        raise DataError(f"{key}: {source}: no text in it")
    return texts


# -- vocabulary ---------------------------------------------------------------------------------------------
def _wordpiece_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else None
    if state is None or state.get("model", {}).get("type") != "WordPiece":
        kind = state.get("model", {}).get("type") if state else type(tokenizer).__name__
        raise RecipeError(f"student.kwargs.trim_vocab: trims WordPiece vocabularies (BERT, MiniLM, `distill tokenizer "
                          f"train --model wordpiece`); this tokenizer is {kind}")
    return state


def kept_tokens(tokenizer: Any, texts: Sequence[str], min_count: int = 1) -> list[int]:
    """Ids to keep, in the vocabulary's order: specials, every token used ``min_count`` times or more in
    ``texts``, and the single-character pieces (word start and ``##`` continuation) of ASCII and of every
    character the texts use, so a word made of those characters can always be spelled."""
    vocab = tokenizer.get_vocab()
    counts = token_counts(tokenizer, texts)
    keep = {i for i, n in counts.items() if n >= min_count}
    keep |= {vocab[t] for t in tokenizer.all_special_tokens if t in vocab}
    keep |= {vocab[t] for t in SPECIALS if t in vocab}
    alphabet = {chr(c) for c in range(33, 127)}
    norm = tokenizer.backend_tokenizer.normalizer
    for t in texts:
        alphabet.update(norm.normalize_str(t) if norm is not None else t)
    alphabet.discard(" ")
    for ch in alphabet:
        for piece in (ch, "##" + ch):
            if piece in vocab:
                keep.add(vocab[piece])
    return sorted(keep)


def trim_vocab(encoder: Any, tokenizer: Any, texts: Sequence[str], min_count: int = 1) -> tuple[Any, dict]:
    """Keep only the tokens ``texts`` use (``kept_tokens``): the encoder's input embeddings shrink in place to
    those rows; returns the trimmed tokenizer (same normalisation and pre-tokenisation, the kept pieces in their
    old order) and a report ``{"kept", "of", "min_count", "unk_share"}`` (unk_share: on ``texts``, after)."""
    import torch

    from ..vocab import _fast

    if min_count < 1:
        raise RecipeError(f"student.kwargs.min_token_count: {min_count}; give 1 or more")
    state = _wordpiece_json(tokenizer)
    keep = kept_tokens(tokenizer, texts, min_count)
    old_vocab = state["model"]["vocab"]
    by_id = {i: t for t, i in old_vocab.items()}
    new_id = {old: new for new, old in enumerate(keep)}
    state["model"]["vocab"] = {by_id[old]: new for old, new in new_id.items()}
    for tok in state.get("added_tokens", []):
        if tok["id"] not in new_id:
            raise RecipeError(f"student.kwargs.trim_vocab: the added token {tok['content']!r} is not kept")
        tok["id"] = new_id[tok["id"]]
    _remap_post_processor(state.get("post_processor"), new_id)
    from tokenizers import Tokenizer

    trimmed = _fast(Tokenizer.from_str(json.dumps(state)))
    trimmed.model_max_length = getattr(tokenizer, "model_max_length", trimmed.model_max_length)
    emb = encoder.get_input_embeddings()
    rows = torch.tensor(keep, dtype=torch.long)
    new = torch.nn.Embedding(len(keep), emb.weight.shape[1], padding_idx=new_id.get(tokenizer.pad_token_id))
    with torch.no_grad():
        new.weight.copy_(emb.weight[rows])
    encoder.set_input_embeddings(new)
    encoder.config.vocab_size = len(keep)
    if getattr(encoder.config, "pad_token_id", None) is not None:
        encoder.config.pad_token_id = new_id.get(encoder.config.pad_token_id, trimmed.pad_token_id)
    report = {"kept": len(keep), "of": len(old_vocab), "min_count": min_count,
              "unk_share": round(unk_share(trimmed, texts), 6)}
    return trimmed, report


def _remap_post_processor(proc: dict | None, new_id: dict[int, int]) -> None:
    if not proc:
        return
    kind = proc.get("type")
    if kind == "Sequence":
        for p in proc.get("processors", []):
            _remap_post_processor(p, new_id)
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for key in ("sep", "cls"):
            proc[key][1] = new_id[proc[key][1]]
    elif kind == "TemplateProcessing":
        for spec in proc.get("special_tokens", {}).values():
            spec["ids"] = [new_id[i] for i in spec["ids"]]


# -- narrower blocks ------------------------------------------------------------------------------------------
def _bert_layers(encoder: Any, key: str):
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    if layers is None or getattr(encoder.config, "model_type", None) not in ("bert", "roberta", "xlm-roberta"):
        raise RecipeError(f"student.kwargs.{key}: narrows BERT-layout encoders (BERT, MiniLM, RoBERTa); this one is "
                          f"{type(encoder).__name__}")
    return layers


def importance(encoder: Any, tokenizer: Any, texts: Sequence[str] | None, context_length: int = 77,
               batch: int = 64, max_texts: int = 2048) -> dict[str, Any]:
    """Scores of the encoder's hidden dimensions (``hidden``: [H]), each block's heads (``heads``: [L][h]) and
    FFN neurons (``ffn``: [L][F]): their effect on the output over ``texts`` (weight magnitude without texts)."""
    import torch

    layers = _bert_layers(encoder, "intermediate_size")
    cfg = encoder.config
    heads, size = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    hidden = torch.zeros(cfg.hidden_size)
    head_score = [torch.zeros(heads) for _ in layers]
    ffn_score = [torch.zeros(layer.intermediate.dense.out_features) for layer in layers]
    if not texts:
        for i, layer in enumerate(layers):
            wo = layer.attention.output.dense.weight.detach()
            wv = layer.attention.self.value.weight.detach()
            head_score[i] = (wo.view(wo.shape[0], heads, size).norm(dim=(0, 2))
                             * wv.view(heads, size, -1).norm(dim=(1, 2)))
            ffn_score[i] = layer.intermediate.dense.weight.detach().norm(dim=1) * layer.output.dense.weight.detach().norm(dim=0)
            hidden += layer.output.LayerNorm.weight.detach().abs()
        return {"hidden": hidden, "heads": head_score, "ffn": ffn_score, "by": "weight magnitude"}
    texts = list(texts)
    if len(texts) > max_texts:  # spread over the whole text: files are often sorted by source or topic
        texts = [texts[i * len(texts) // max_texts] for i in range(max_texts)]
    mask_now: list[torch.Tensor] = []
    hooks, tokens = [], [0]

    def masked(x):  # [B, T, D] -> sum over real tokens of |x|, [D]
        return (x.detach().abs() * mask_now[0][..., None]).sum(dim=(0, 1))

    def on_hidden(_m, _inp, out):
        hidden.add_(masked(out))

    def on_context(i):
        def hook(m, inp):
            ctx = inp[0].detach()
            wo = m.weight.detach().view(m.weight.shape[0], heads, size)
            per = ctx.view(*ctx.shape[:2], heads, size)
            contrib = torch.einsum("bthd,ohd->btho", per, wo).norm(dim=-1)  # [B, T, heads]
            head_score[i].add_((contrib * mask_now[0][..., None]).sum(dim=(0, 1)))
        return hook

    def on_ffn(i):
        def hook(m, inp):
            ffn_score[i].add_(masked(inp[0]) * m.weight.detach().norm(dim=0))
        return hook

    hooks.append(encoder.embeddings.LayerNorm.register_forward_hook(on_hidden))
    for i, layer in enumerate(layers):
        hooks.append(layer.attention.output.LayerNorm.register_forward_hook(on_hidden))
        hooks.append(layer.output.LayerNorm.register_forward_hook(on_hidden))
        hooks.append(layer.attention.output.dense.register_forward_pre_hook(on_context(i)))
        hooks.append(layer.output.dense.register_forward_pre_hook(on_ffn(i)))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(texts), batch):
                enc = tokenizer(texts[s:s + batch], padding=True, truncation=True, max_length=context_length,
                                return_tensors="pt")
                mask_now[:] = [enc["attention_mask"].float()]
                tokens[0] += int(enc["attention_mask"].sum())
                encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in hooks:
            h.remove()
        encoder.train(was_training)
    n = max(tokens[0], 1)
    return {"hidden": hidden / n, "heads": [h / n for h in head_score], "ffn": [f / n for f in ffn_score],
            "by": f"effect on the output over {len(texts)} texts"}


def narrow(encoder: Any, hidden_size: int | None = None, intermediate_size: int | None = None,
           scores: dict[str, Any] | None = None) -> tuple[Any, dict]:
    """A new BERT encoder with ``hidden_size`` (a multiple of the head size: the heads kept are the most
    important ones) and ``intermediate_size`` FFN neurons per block, its weights taken from ``encoder``'s most
    important dimensions (``importance``). Returns the encoder and the kept indices ``{"hidden": [...],
    "heads": [[...]], "ffn": [[...]], "by"}`` (``hidden`` also selects the projection head's inputs)."""
    import copy

    import torch

    _bert_layers(encoder, "intermediate_size" if hidden_size is None else "hidden_size")
    cfg = encoder.config
    size = cfg.hidden_size // cfg.num_attention_heads
    hidden_size = cfg.hidden_size if hidden_size is None else int(hidden_size)
    intermediate_size = cfg.intermediate_size if intermediate_size is None else int(intermediate_size)
    if not 0 < hidden_size <= cfg.hidden_size or hidden_size % size:
        raise RecipeError(f"student.kwargs.hidden_size: {hidden_size}; narrowing keeps whole heads of {size} "
                          f"dimensions: give a multiple of {size} up to {cfg.hidden_size}")
    if not 0 < intermediate_size <= cfg.intermediate_size:
        raise RecipeError(f"student.kwargs.intermediate_size: {intermediate_size}; give 1 to {cfg.intermediate_size} "
                          "(the pretrained encoder's FFN width)")
    scores = scores or importance(encoder, None, None)
    top = lambda s, k: sorted(torch.topk(s, k).indices.tolist())  # noqa: E731
    keep_h = torch.tensor(top(scores["hidden"], hidden_size))
    n_heads = hidden_size // size
    keep_heads = [top(s, n_heads) for s in scores["heads"]]
    keep_ffn = [top(s, intermediate_size) for s in scores["ffn"]]

    new_cfg = copy.deepcopy(cfg)
    new_cfg.hidden_size, new_cfg.num_attention_heads, new_cfg.intermediate_size = hidden_size, n_heads, intermediate_size
    from .base import auto_model

    new = auto_model(type(encoder), new_cfg)
    src = encoder.state_dict()
    out = {}
    with torch.no_grad():
        for name, value in new.state_dict().items():
            w = src[name]
            out[name] = _slice(name, w, keep_h, keep_heads, keep_ffn, size, cfg.hidden_size)
            if out[name].shape != value.shape:  # a layout this function does not know: refuse, never guess
                raise RecipeError(f"student.kwargs.hidden_size: cannot narrow {name} ({tuple(w.shape)} -> "
                                  f"{tuple(value.shape)})")
    new.load_state_dict(out)
    return new, {"hidden": keep_h.tolist(), "heads": keep_heads, "ffn": keep_ffn, "by": scores["by"]}


def _slice(name: str, w, keep_h, keep_heads, keep_ffn, size: int, old_hidden: int) -> Any:
    """``name``'s weights at the kept hidden dimensions, heads and FFN neurons of its block."""
    import torch

    def head_rows(i):
        return torch.tensor([h * size + d for h in keep_heads[i] for d in range(size)])

    if not name.endswith(("weight", "bias")):  # buffers (position ids)
        return w
    if ".layer." not in name:  # embeddings: every row keeps the chosen hidden dimensions
        return w[..., keep_h] if w.shape[-1] == old_hidden else w
    i = int(name.split(".layer.")[1].split(".")[0])
    if any(k in name for k in ("self.query", "self.key", "self.value")):
        rows = head_rows(i)
        return w[rows][:, keep_h] if name.endswith("weight") else w[rows]
    if "attention.output.dense" in name:
        return w[keep_h][:, head_rows(i)] if name.endswith("weight") else w[keep_h]
    if "intermediate.dense" in name:
        ffn = torch.tensor(keep_ffn[i])
        return w[ffn][:, keep_h] if name.endswith("weight") else w[ffn]
    if name.endswith("output.dense.weight"):
        return w[keep_h][:, torch.tensor(keep_ffn[i])]
    if "LayerNorm" in name or name.endswith("output.dense.bias"):
        return w[keep_h]
    return w


def shrink_text_tower(tower: Any, texts: Sequence[str] | None, trim: bool, min_count: int = 1,
                      hidden_size: int | None = None, intermediate_size: int | None = None) -> dict:
    """Narrow and/or trim a pretrained text tower in place (``bert_small``'s options); the record saved in its
    spec: what was kept and how it was chosen."""
    import torch

    record: dict[str, Any] = {}
    if hidden_size is not None or intermediate_size is not None:
        scores = importance(tower.encoder, tower.tokenizer, texts, tower.context_length)
        old_width = tower.encoder.config.hidden_size
        tower.encoder, kept = narrow(tower.encoder, hidden_size, intermediate_size, scores)
        if tower.encoder.config.hidden_size != old_width:
            proj = torch.nn.Linear(len(kept["hidden"]), tower.proj.out_features, bias=tower.proj.bias is not None)
            with torch.no_grad():
                proj.weight.copy_(tower.proj.weight[:, kept["hidden"]])
                if proj.bias is not None:
                    proj.bias.copy_(tower.proj.bias)
            tower.proj = proj
        cfg = tower.encoder.config
        record["narrowed"] = {"hidden_size": cfg.hidden_size, "num_heads": cfg.num_attention_heads,
                              "intermediate_size": cfg.intermediate_size, "by": kept["by"]}
    if trim:
        tower.tokenizer, report = trim_vocab(tower.encoder, tower.tokenizer, texts, min_count)
        record["trimmed_vocab"] = report
    return record
