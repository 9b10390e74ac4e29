"""A vision-language model from parts: features of a frozen tower -> the adapter's projector -> image tokens
spliced into the LM's chat prompt -> a frozen causal LM (optionally with LoRA). ``loss`` trains on the answer
tokens only; ``generate`` captions or answers, batched, greedy or sampled."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from ..progress import progress
from .adapter import Projector, adapter_folder, check_lm, portable, read_adapter, resolve, save_adapter
from .lm import ChatPrompt, lm_identity

IGNORE = -100  # a label that carries no loss (prompt and image positions)


class VisionLanguageModel(nn.Module):
    """``projector`` (trained) + ``lm`` (frozen; LoRA adapters train when ``lora`` > 0) with ``tokenizer`` and
    the chat ``prompt`` (``ChatPrompt``). ``vision``: the identity of the tower its features come from."""

    def __init__(self, projector: Projector, lm: nn.Module, tokenizer: Any, prompt: str, system: str | None = None,
                 vision: dict[str, Any] | None = None, lm_source: dict[str, Any] | None = None,
                 max_answer_tokens: int = 40, lora: dict[str, Any] | None = None):
        super().__init__()
        self.projector = projector
        self.lm = lm
        self.tokenizer = tokenizer
        self.prompt_text, self.system = prompt, system
        self.chat = ChatPrompt.build(tokenizer, prompt, system)
        self.vision = dict(vision or {})
        self.lm_source = dict(lm_source or {})
        self.max_answer_tokens = max_answer_tokens
        self.lora = dict(lora or {})
        if self.lora.get("rank"):
            self._add_lora()

    # -- what trains, what is saved ----------------------------------------------
    def _add_lora(self) -> None:
        from .._imports import require

        peft = require("peft", "LoRA on the language model (vlm.lm_lora)")
        targets = list(self.lora.get("targets") or ["q_proj", "v_proj"])
        cfg = peft.LoraConfig(r=int(self.lora["rank"]), lora_alpha=float(self.lora.get("alpha", 16.0)),
                              target_modules=targets, lora_dropout=0.0)
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in self.lm.named_modules() if isinstance(m, nn.Linear)})
        if not set(targets) & set(linear):
            from ..errors import RecipeError

            raise RecipeError(f"vlm.lm_lora_targets: {targets} name no layer of the language model (its linear "
                              f"layers: {', '.join(linear)})")
        self.lm = peft.get_peft_model(self.lm, cfg)

    def lora_state(self) -> dict[str, torch.Tensor]:
        if not self.lora.get("rank"):
            return {}
        from peft import get_peft_model_state_dict

        return dict(get_peft_model_state_dict(self.lm))

    def load_lora_state(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.lm, state)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        """``train.grad_checkpointing``: recompute the LM's activations in the backward pass."""
        if enable and hasattr(self.lm, "gradient_checkpointing_enable"):
            self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.lm.enable_input_require_grads() if hasattr(self.lm, "enable_input_require_grads") else None
            return True
        return not enable

    def towers(self) -> dict[str, nn.Module]:
        return {}  # no tower runs here: its features come in

    # -- the sequence --------------------------------------------------------------
    def _embed_ids(self, ids: Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()
        ids = torch.as_tensor(ids, dtype=torch.long, device=emb.weight.device)
        out = emb(ids)
        return out.unsqueeze(0).expand(batch, -1, -1) if out.ndim == 2 else out

    def prompt_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """[B, P, H]: the chat prompt with the image tokens in place of the image."""
        image = self.projector(features.to(self.lm.get_input_embeddings().weight.device).float())
        b = image.shape[0]
        return torch.cat([self._embed_ids(self.chat.before, b).to(image.dtype), image,
                          self._embed_ids(self.chat.after, b).to(image.dtype)], dim=1)

    def labels(self, prompt_len: int, answer_ids: torch.Tensor, answer_mask: torch.Tensor) -> torch.Tensor:
        """[B, P + A] labels: the answer's ids where it has tokens, IGNORE on the prompt, the image and padding."""
        b = answer_ids.shape[0]
        ignore = torch.full((b, prompt_len), IGNORE, dtype=torch.long, device=answer_ids.device)
        return torch.cat([ignore, answer_ids.masked_fill(answer_mask == 0, IGNORE)], dim=1)

    def loss(self, features: torch.Tensor, answers: Sequence[str], reuse_prefix: bool = True,
             reduction: str = "mean") -> tuple[torch.Tensor, int]:
        """Cross-entropy over the answer tokens (prompt and image positions carry none), their ``mean`` or
        ``sum``; (loss, answer tokens).
        ``reuse_prefix``: the chat prompt's opening (the same for every row: the system turn, the user's
        header) runs through the frozen LM once and its keys and values are reused, unless LoRA changes them."""
        dev = self.lm.get_input_embeddings().weight.device
        ids, mask = self.chat.answer_ids(self.tokenizer, list(answers), self.max_answer_tokens)
        ids, mask = ids.to(dev), mask.to(dev)
        prompt = self.prompt_embeds(features)
        p, b = prompt.shape[1], prompt.shape[0]
        x = torch.cat([prompt, self._embed_ids(ids, b).to(prompt.dtype)], dim=1)
        attn = torch.cat([torch.ones((b, p), dtype=torch.long, device=dev), mask], dim=1)
        target = self.labels(p, ids, mask)[:, p:]
        past = self._prefix_cache(b) if reuse_prefix and self._can_reuse_prefix() else None
        if past is not None:
            n = len(self.chat.before)
            x, attn = x[:, n:], torch.cat([torch.ones((b, n), dtype=torch.long, device=dev), attn[:, n:]], dim=1)
        # logits only where a next token is scored: the position before each answer token (the LM head over a
        # 49k vocabulary at every prompt position would cost more than the rest of the step)
        cache = {_cache_arg(self.lm): past} if past is not None else {}
        logits = self.lm(inputs_embeds=x, attention_mask=attn, use_cache=past is not None,
                         logits_to_keep=ids.shape[1] + 1, **cache).logits[:, :-1]
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE,
                               reduction=reduction)
        return loss, int((target != IGNORE).sum())

    def _can_reuse_prefix(self) -> bool:
        checkpointing = "is_activation_checkpointing" if hasattr(type(self.lm), "is_activation_checkpointing") \
            else "is_gradient_checkpointing"  # transformers 5 renamed it
        return not self.lora.get("rank") and not getattr(self.lm, checkpointing, False) and len(self.chat.before) > 0

    def _prefix_cache(self, batch: int) -> Any:
        """A cache holding the keys and values of ``chat.before`` for ``batch`` rows (computed once per prompt,
        device and precision); None where transformers' cache has no per-layer tensors."""
        from transformers import DynamicCache

        dev = self.lm.get_input_embeddings().weight.device
        key = (tuple(self.chat.before), str(dev), torch.is_autocast_enabled(dev.type))
        if getattr(self, "_prefix", (None,))[0] != key:
            with torch.no_grad():
                out = self.lm(inputs_embeds=self._embed_ids(self.chat.before, 1), use_cache=True)
            past = out["cache"] if "cache" in out else out["past_key_values"]  # renamed in transformers 5.2x
            if not hasattr(past, "layers"):  # an older transformers' cache: run the whole prompt every step
                return None
            self._prefix = (key, [(layer.keys, layer.values) for layer in past.layers])
        cache = DynamicCache(config=self.lm.config)
        for i, (k, v) in enumerate(self._prefix[1]):
            cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), i)
        return cache

    # -- generation ------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, features: torch.Tensor, max_new_tokens: int = 40, sample: bool = False,
                 temperature: float = 1.0, top_p: float = 0.9, batch_size: int = 32, seed: int = 0,
                 show_progress: bool = True) -> list[str]:
        """One answer per feature row, in order: greedy (the same every time), or sampled with ``temperature``
        and ``top_p`` from ``seed``."""
        self.eval()
        out: list[str] = []
        gen = torch.Generator().manual_seed(seed)
        with progress(len(features), "generate", "image", enabled=show_progress) as bar:
            for i in range(0, len(features), batch_size):
                x = self.prompt_embeds(features[i:i + batch_size])
                if sample:
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                ids = self.lm.generate(
                    inputs_embeds=x, attention_mask=torch.ones(x.shape[:2], dtype=torch.long, device=x.device),
                    max_new_tokens=max_new_tokens, do_sample=sample, temperature=temperature if sample else None,
                    top_p=top_p if sample else None, top_k=None, eos_token_id=self.chat.stop,
                    pad_token_id=self.tokenizer.pad_token_id)
                out += [s.strip() for s in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]
                bar.update(x.shape[0])
        return out

    # -- saving ------------------------------------------------------------------------
    def config(self, folder: Path) -> dict[str, Any]:
        src = dict(self.lm_source)
        if src.get("lm"):
            src["lm"] = portable(src["lm"], folder)
        return {"vision": self.vision, "lm": {**lm_identity(self._base_lm(), src.get("name")), **src},
                "prompt": {"prompt": self.prompt_text, "system": self.system},
                "max_answer_tokens": self.max_answer_tokens, "lora": self.lora or None}

    def _base_lm(self) -> nn.Module:
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def save(self, folder: str | os.PathLike, card: str = "") -> Path:
        """The adapter only (projector + LoRA tensors + config naming the tower and the LM), not the LM."""
        folder = Path(folder)
        from ..version import __version__

        vision = dict(self.vision)
        if vision.get("path"):
            vision["path"] = portable(vision["path"], folder)
        cfg = {**self.config(folder), "vision": vision, "distill_version": __version__,
               "provenance": getattr(self, "provenance", None)}
        save_adapter(folder, self.projector, cfg, self.lora_state())
        if card:
            from ..io import atomic_write_text

            atomic_write_text(folder / "README.md", card)
        return folder


def _cache_arg(lm: nn.Module) -> str:
    """The name a model's forward takes its key-value cache by (``cache`` from transformers 5.2x on)."""
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def load_vlm(adapter: str | os.PathLike, lm: Any = None, tokenizer: Any = None, lm_name: str | None = None,
             gguf_file: str | None = None) -> VisionLanguageModel:
    """A saved adapter with its LM: the one its config names (a local path relative to the adapter folder, or a
    hub name), or ``lm_name`` / ``lm`` + ``tokenizer``; an LM other than the one it was trained into is
    refused, naming the field. The tower is checked where features are made (``caption_images``)."""
    from .lm import load_lm

    folder = adapter_folder(adapter)
    cfg, projector, lora_state = read_adapter(folder)
    src = cfg["lm"]
    if lm is None:
        name = lm_name or resolve(src.get("lm"), folder)
        try:
            lm, tokenizer = load_lm(name, gguf_file if lm_name else src.get("gguf_file"), src.get("chat_template"))
        except ModelError as e:
            said = f"the language model {name}" if lm_name else f"the language model its config names ({name})"
            raise ModelError(f"{folder}: {said} cannot be loaded ({str(e).removeprefix('vlm.lm: ')}); pass the LM "
                             "it was trained with (--lm, or load_vlm(..., lm_name=...))") from None
        src = {**src, "lm": name}
    check_lm(cfg["lm"], lm_identity(lm, src.get("name")))
    vision = dict(cfg["vision"])
    if vision.get("path"):
        vision["path"] = resolve(vision["path"], folder)
    p = cfg["prompt"]
    model = VisionLanguageModel(projector, lm, tokenizer, p["prompt"], p.get("system"), vision,
                                {k: src.get(k) for k in ("lm", "gguf_file", "chat_template", "name")},
                                cfg.get("max_answer_tokens", 40), cfg.get("lora") or None)
    model.load_lora_state(lora_state)
    return model.eval()


__all__ = ["VisionLanguageModel", "load_vlm", "IGNORE"]
