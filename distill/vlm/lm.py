"""The language model side: a Hugging Face causal LM by hub name, local folder or GGUF file, frozen; its
identity (what an adapter is tied to); and its chat template cut around the image (``ChatPrompt``)."""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError, first_line

log = logging.getLogger(__name__)

IMAGE_MARK = "<|distill-image|>"  # where the image tokens go in the rendered chat; never tokenized


def split_lm_path(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """(what ``from_pretrained`` reads, the GGUF file in it): ``x/model.gguf`` -> (``x``, ``model.gguf``)."""
    if gguf_file is None and str(name).lower().endswith(".gguf"):
        p = Path(os.path.expanduser(name))
        return str(p.parent), p.name
    return (str(Path(os.path.expanduser(name))) if os.path.exists(os.path.expanduser(name)) else name), gguf_file


def load_lm(name: str, gguf_file: str | None = None, chat_template: str | None = None,
            dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A frozen causal LM and its tokenizer: ``name`` is a hub id, a local folder, or a ``.gguf`` file
    (transformers dequantizes it to ``dtype``; needs the ``gguf`` package). Errors name what to pass."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, gguf = split_lm_path(name, gguf_file)
    where = os.path.join(source, gguf) if gguf else source
    if gguf:
        if not os.path.isfile(where):
            raise ModelError(f"vlm.lm: {where}: no such GGUF file")
        from .._imports import require

        require("gguf", "reading a GGUF language model")
    elif not os.path.exists(source) and (os.path.isabs(source) or source.startswith((".", "~")) or
                                         source.count("/") > 1):
        raise ModelError(f"vlm.lm: {source}: no such folder or file (a local LM folder, a .gguf file, or a hub name "
                         "like HuggingFaceTB/SmolLM2-135M-Instruct)")
    elif os.path.isdir(source):
        files = set(os.listdir(source))
        if not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}:
            raise ModelError(f"vlm.lm: {source} has no tokenizer (tokenizer.json or tokenizer_config.json): save the "
                             "LM's tokenizer into that folder (tokenizer.save_pretrained), or pass its hub name")
    kw = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kw)
    except Exception as e:  # noqa: BLE001 - any failure to read is the user's file or name
        raise _load_error(e, where, gguf, "tokenizer") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001
        raise _load_error(e, where, gguf, "model") from None
    if chat_template:
        tokenizer.chat_template = chat_template
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError(f"vlm.lm: {where}'s tokenizer has no chat template: pass vlm.chat_template (a Jinja "
                         "template, e.g. the one of the model's Instruct version), or use an Instruct/chat model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = where
    return model, tokenizer


def _load_error(e: BaseException, where: str, gguf: str | None, what: str) -> ModelError:
    if gguf:
        return ModelError(f"vlm.lm: transformers cannot read the GGUF file {where} ({first_line(e, 160)}); pass a "
                          "GGUF of an architecture transformers supports (llama, mistral, qwen2, ...) or the model's "
                          "folder")
    if not os.path.exists(where):
        return ModelError(f"vlm.lm: {where} cannot be loaded ({first_line(e, 160)}); without a model hub, pass a "
                          "local folder or a .gguf file")
    return ModelError(f"vlm.lm: {where}: its {what} cannot be loaded ({first_line(e, 160)})")


def lm_identity(model: nn.Module, name: str | None = None) -> dict[str, Any]:
    """What an adapter trained into this LM depends on: its kind, widths and a digest of its token embeddings
    (the same model read from a hub, a folder or a GGUF gives the same digest only if the weights agree)."""
    emb = model.get_input_embeddings().weight.detach().float().cpu().contiguous()
    h = hashlib.sha256(emb.numpy().tobytes()).hexdigest()[:16]
    cfg = model.config
    return {"name": os.path.basename(str(name or getattr(model, "name_or_path", "") or "").rstrip("/")),
            "arch": type(model).__name__, "hidden_size": int(cfg.hidden_size), "vocab_size": int(emb.shape[0]),
            "weights": f"embeddings:{h}"}


@dataclass
class ChatPrompt:
    """The token ids around the image in the LM's own chat template: ``before`` + image tokens + ``after`` is
    the prompt the answer follows; ``end`` closes the answer (the template's end of turn); ``stop``: the ids
    that end generation."""

    before: list[int]
    after: list[int]
    end: list[int]
    stop: list[int]
    text: str

    @classmethod
    def build(cls, tokenizer: Any, prompt: str, system: str | None = None) -> "ChatPrompt":
        turn = [{"role": "user", "content": f"{IMAGE_MARK}\n{prompt}"}]
        if system is not None:
            turn = [{"role": "system", "content": system}] + turn
        try:
            ask = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
            probe = "Zq9"
            full = tokenizer.apply_chat_template(turn + [{"role": "assistant", "content": probe}], tokenize=False)
        except Exception as e:  # noqa: BLE001 - a template that does not render is the user's template
            raise ModelError(f"vlm.chat_template: the chat template does not render ({first_line(e, 160)})") from None
        if IMAGE_MARK not in ask:
            raise ModelError("vlm.chat_template: the chat template drops the user's message; pass one that keeps it")
        head, tail = ask.split(IMAGE_MARK, 1)
        end = full.split(probe, 1)[1].rstrip() if full.startswith(ask) and probe in full[len(ask):] else ""
        ids = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        end_ids = ids(end) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        stop = {i for i in (tokenizer.eos_token_id, end_ids[0] if len(end_ids) == 1 else None) if i is not None}
        # a BOS the tokenizer adds by itself (Llama's) starts the prompt, as in the LM's own training
        bos = [tokenizer.bos_token_id] if getattr(tokenizer, "add_bos_token", False) and tokenizer.bos_token_id is \
            not None and not ask.startswith(str(tokenizer.bos_token)) else []
        return cls(bos + ids(head), ids(tail), end_ids, sorted(stop), ask)

    def answer_ids(self, tokenizer: Any, answers: list[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Answers as ids closed by ``end``, cut to ``max_tokens`` (end included), right-padded: (ids, mask)."""
        enc = _plain_ids(tokenizer, [a.strip() for a in answers])
        rows = [(e[:max(1, max_tokens - len(self.end))] + self.end) for e in enc]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            mask[i, :len(r)] = 1
        return ids, mask


def _plain_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of texts read as plain text: a caption that contains ``<|im_end|>`` or ``</s>`` must not teach
    the model to end its turn there."""
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    except TypeError:  # a tokenizer without the option
        return tokenizer(texts, add_special_tokens=False)["input_ids"]


__all__ = ["load_lm", "lm_identity", "ChatPrompt", "split_lm_path", "IMAGE_MARK"]
