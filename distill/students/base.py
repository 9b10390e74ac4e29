"""Student towers and the two-tower Student that holds them.

A tower is a trunk (timm image model or transformers text encoder) plus a linear
projection head into the teacher's embedding space. ``Student.save`` writes
``model.safetensors`` + ``config.json`` (+ the text trunk's HF config and tokenizer),
enough for :func:`load_student` to rebuild it without the trainer or any hub.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, RecipeError
from ..io import portable_teacher, save_tensors, write_json
from ..transforms import PreprocessCfg, eval_transform
from ..version import __version__
from .roles import TowerRoles

FORMAT = "clip-distill-student/1"


def keep_space(proj: nn.Linear) -> None:
    """Start a square projection head as the identity, so a pretrained trunk's embedding space is
    kept as it is (a locked tower's head then changes nothing)."""
    if proj.in_features == proj.out_features:
        with torch.no_grad():
            proj.weight.copy_(torch.eye(proj.in_features))
            if proj.bias is not None:
                proj.bias.zero_()


class ImageTower(TowerRoles, nn.Module):
    """timm trunk (pooled features) -> linear projection to ``embed_dim``."""

    backbone_attr = "trunk"

    def __init__(self, trunk: nn.Module, embed_dim: int, preprocess: PreprocessCfg, spec: dict[str, Any]):
        super().__init__()
        self.trunk = trunk
        self.proj = nn.Linear(trunk.num_features, embed_dim)
        self.preprocess = preprocess
        self.spec = spec  # {"arch", "timm_name", "model_kwargs"}: rebuilds the trunk offline

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(self.trunk(pixels))

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        if hasattr(self.trunk, "set_grad_checkpointing"):
            self.trunk.set_grad_checkpointing(enable)
            return True
        return False


POOLING = ("mean", "cls", "max")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states [B, T, D] over the real tokens of ``mask`` [B, T] (sentence-transformers'
    mean / cls / max)."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    if mode != "mean":
        raise RecipeError(f"pooling {mode!r}: use one of {POOLING}")
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)


def auto_model(factory, source):
    """``factory(source)`` without the pooler BERT-like encoders carry unused (so every parameter trains)."""
    try:
        return factory(source, add_pooling_layer=False)
    except TypeError:
        return factory(source)


class TextTower(TowerRoles, nn.Module):
    """transformers encoder -> mean/cls/max pooling -> linear projection to ``embed_dim``.

    New towers have a bias-free head (``spec["proj_bias"] = False``), as CLIP's text projection:
    open_clip and sentence-transformers then hold it exactly. Folders saved before that have no
    ``proj_bias`` key and keep their bias."""

    backbone_attr = "encoder"

    def __init__(self, encoder: nn.Module, tokenizer: Any, embed_dim: int, spec: dict[str, Any]):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.embed_dim = embed_dim
        self.proj = nn.Linear(encoder.config.hidden_size, embed_dim, bias=bool(spec.get("proj_bias", True)))
        self.spec = spec  # {"arch", "pooling", "context_length", "proj_bias"}
        self.pooling = spec.get("pooling", "mean")
        if self.pooling not in POOLING:
            raise RecipeError(f"student.kwargs.pooling: {self.pooling!r} is not one of {POOLING}")
        self.context_length = int(spec.get("context_length", 77))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        out = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.context_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = (input_ids != (self.tokenizer.pad_token_id or 0)).long()
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.proj(pool(hidden, attention_mask, self.pooling))

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        if hasattr(self.encoder, "gradient_checkpointing_enable") and enable:
            self.encoder.gradient_checkpointing_enable()
            return True
        return False

    def save_pretrained(self, folder: str | Path) -> None:
        """The encoder's HF config and the tokenizer (the weights live in the student's safetensors)."""
        self.encoder.config.save_pretrained(folder)
        self.tokenizer.save_pretrained(str(folder))


class OpenClipTextTower(TowerRoles, nn.Module):
    """An open_clip text tower kept whole (its tokenizer, pooling and projection): what an image
    student paired with an open_clip teacher uses, so paired text embeddings are the teacher's."""

    backbone_attr = "encoder"

    def __init__(self, encoder: nn.Module, tokenizer: Any, embed_dim: int, spec: dict[str, Any]):
        super().__init__()
        self.encoder = encoder  # open_clip TextTransformer: ids [B, T] -> pooled, projected [B, embed_dim]
        self.tokenizer = tokenizer  # open_clip tokenizer: list[str] -> ids [B, context_length]
        self.embed_dim = embed_dim
        self.spec = spec  # {"arch", "openclip", "model_cfg": {embed_dim, quick_gelu, text_cfg}}
        text_cfg = spec["model_cfg"]["text_cfg"]
        self.pooling = getattr(encoder, "pool_type", "argmax")
        self.context_length = int(text_cfg.get("context_length", 77))
        self.pad_id = int(text_cfg.get("pad_id", 0))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(list(texts), context_length=self.context_length)
        return {"input_ids": ids, "attention_mask": (ids != self.pad_id).long()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids)  # causal attention + EOT pooling: padding needs no mask

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        self.encoder.set_grad_checkpointing(enable)
        return True

    def save_pretrained(self, folder: str | Path) -> None:
        """``open_clip_config.json`` (+ an HF tokenizer's files): ``open_clip.get_tokenizer("local-dir:...")`` reads it."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        write_json(Path(folder) / "open_clip_config.json", {"model_cfg": self.spec["model_cfg"]})
        if hasattr(self.tokenizer, "save_pretrained"):  # HFTokenizer; the CLIP BPE ships with open_clip
            self.tokenizer.save_pretrained(str(folder))


class Student(nn.Module):
    """An image tower, a text tower, or both, projecting into one ``embed_dim`` space."""

    def __init__(self, image: ImageTower | None = None, text: TextTower | OpenClipTextTower | None = None,
                 embed_dim: int = 512):
        super().__init__()
        if image is None and text is None:
            raise ValueError("a student needs an image tower, a text tower, or both")
        self.image = image
        self.text = text
        self.embed_dim = embed_dim
        self.teacher_identity: dict[str, Any] | None = None  # set by the trainer, saved in config.json
        # how it was made (recipe, data, steps), set by the trainer: saved in config.json, shown in its model card
        self.provenance: dict[str, Any] | None = None

    # -- properties ---------------------------------------------------------------
    @property
    def modality(self) -> str:
        return "both" if self.image is not None and self.text is not None else ("image" if self.image else "text")

    @property
    def has_image(self) -> bool:
        return self.image is not None

    @property
    def has_text(self) -> bool:
        return self.text is not None

    @property
    def preprocess(self) -> PreprocessCfg | None:
        return self.image.preprocess if self.image is not None else None

    @property
    def image_transform(self):
        """PIL image -> normalised tensor with the student's eval preprocessing."""
        if self.image is None:
            raise ModelError("this student has no image tower")
        return eval_transform(self.image.preprocess)

    @property
    def tokenizer(self):
        return self.text.tokenizer if self.text is not None else None

    def towers(self) -> dict[str, nn.Module]:
        """``{"image": tower, "text": tower}`` of the towers it has."""
        return {name: t for name, t in (("image", self.image), ("text", self.text)) if t is not None}

    def token_counts(self, texts: Sequence[str | None], chunk: int = 4096) -> list[int]:
        """Each text's token count under the text tower's own tokenizer (``data.group_by_length``)."""
        out: list[int] = []
        for i in range(0, len(texts), chunk):
            out += self.tokenize([t or "" for t in texts[i:i + chunk]])["attention_mask"].sum(1).tolist()
        return out

    def weights_id(self, tower: str) -> str | None:
        """A digest of ``tower``'s weights (float32, by name): the same for every export of the same tower, so
        that what one export embedded can be matched with another (a photo index, an INT8 copy)."""
        import hashlib

        module = getattr(self, tower)
        if module is None:
            return None
        h = hashlib.sha256()
        for name, value in sorted(module.state_dict().items()):
            h.update(name.encode() + b"\0")
            h.update(value.detach().cpu().float().contiguous().numpy().tobytes() if value.is_floating_point()
                     else value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def num_params(self, tower: str | None = None) -> int:
        mod = self if tower is None else getattr(self, tower)
        return 0 if mod is None else sum(p.numel() for p in mod.parameters())

    # -- encoding -----------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        if self.text is None:
            raise ModelError("this student has no text tower")
        return self.text.tokenize(texts)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Unnormalised projected image embeddings (used in training)."""
        if self.image is None:
            raise ModelError("this student has no image tower")
        return self.image(pixels)

    def text_features(self, tokens: Any) -> torch.Tensor:
        """Unnormalised projected text embeddings; ``tokens``: list[str], id tensor or tokenizer dict."""
        if self.text is None:
            raise ModelError("this student has no text tower")
        if isinstance(tokens, (list, tuple)) and (not tokens or isinstance(tokens[0], str)):
            tokens = self.tokenize(tokens)
        device = next(self.text.parameters()).device
        if isinstance(tokens, torch.Tensor):
            return self.text(tokens.to(device))
        return self.text(tokens["input_ids"].to(device), tokens.get("attention_mask").to(device))

    def encode_image(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """L2-normalised image embeddings in the teacher's space."""
        device = next(self.image.parameters()).device if self.image is not None else None
        z = self.image_features(pixels.to(device))
        return F.normalize(z, dim=-1) if normalize else z

    def encode_text(self, tokens: Any, normalize: bool = True) -> torch.Tensor:
        """L2-normalised text embeddings; ``tokens``: list of strings or token ids."""
        z = self.text_features(tokens)
        return F.normalize(z, dim=-1) if normalize else z

    def forward(self, pixels: torch.Tensor | None = None, text: Any = None) -> dict[str, torch.Tensor]:
        out = {}
        if pixels is not None and self.image is not None:
            out["image"] = self.image_features(pixels)
        if text is not None and self.text is not None:
            out["text"] = self.text_features(text)
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> bool:
        done = [t.set_grad_checkpointing(enable) for t in (self.image, self.text) if t is not None]
        return any(done)

    def into_space_of(self, model: "Student", tower: str = "text") -> "Student":
        """A copy of this student with ``model``'s ``tower`` projection head after its own: for a student that
        learnt the output of ``model``'s trunk (a text student distilled from a two-tower model's text
        encoder), its embeddings in ``model``'s shared space. Both heads are linear and bias-free, so the
        composition is exact; this student is left as it is."""
        mine, theirs = getattr(self, tower), getattr(model, tower)
        if mine is None or theirs is None or mine.head is None or theirs.head is None:
            raise ModelError(f"into_space_of: both models need a {tower} tower with a projection head of its own")
        if mine.head.bias is not None or theirs.head.bias is not None:
            raise ModelError("into_space_of: composing heads needs bias-free projections")
        if theirs.head.in_features != mine.head.out_features:
            raise ModelError(f"into_space_of: this student's {tower} embedding has {mine.head.out_features} dims and "
                             f"the other head reads {theirs.head.in_features}")
        out = copy.deepcopy(self)
        tower_copy = getattr(out, tower)
        proj = nn.Linear(mine.head.in_features, theirs.head.out_features, bias=False)
        with torch.no_grad():
            proj.weight.copy_(theirs.head.weight @ mine.head.weight)
        tower_copy.proj, out.embed_dim = proj, theirs.head.out_features
        if hasattr(tower_copy, "embed_dim"):
            tower_copy.embed_dim = theirs.head.out_features
        return out

    # -- persistence --------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"format": FORMAT, "distill_version": __version__, "embed_dim": self.embed_dim}
        if self.image is not None:
            cfg["image"] = {**copy.deepcopy(self.image.spec), "preprocess": self.image.preprocess.to_dict()}
        if self.text is not None:
            cfg["text"] = copy.deepcopy(self.text.spec)
        if self.teacher_identity is not None:
            cfg["teacher"] = self.teacher_identity
        if self.provenance is not None:
            cfg["trained"] = self.provenance
        return cfg

    def save(self, path: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write ``model.safetensors`` + ``config.json`` (+ ``text/`` HF config and tokenizer) as one folder:
        a saved model there is replaced whole (the old one stays until the new one is complete); a folder
        holding anything else is refused."""
        from ..outputs import SAVED_MODEL, claim, staged

        path = Path(path)
        claim(path, "a saved model", key=str(path), flag="delete it first", same=(SAVED_MODEL,))
        with staged(path) as tmp:
            self.write(tmp, dtype)
        return path

    def write(self, folder: str | Path, dtype: torch.dtype | None = None) -> None:
        """The files of ``save`` into ``folder`` as it is (no check of what it holds)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        if self.text is not None:
            self.text.save_pretrained(folder / "text")
        save_tensors(folder / "model.safetensors", state, metadata={"format": FORMAT})
        cfg = self.config()
        if "teacher" in cfg:
            cfg["teacher"] = portable_teacher(cfg["teacher"], folder)
        write_json(folder / "config.json", cfg)
        from ..card import write_card

        write_card(folder, self)
