"""The recipe schema: typed sections with every default and a comment per field, as open_clip's
``CLIPVisionCfg``. A recipe YAML lists only what differs from these defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

DEFAULT_TEACHER = "openclip_vit_b32"  # what an online run uses when the recipe names no teacher
PRECISIONS = ("auto", "no", "fp16", "bf16")
OPTIMIZERS = ("adamw", "adamw8bit")
CACHE_DTYPES = ("fp16", "fp32")
LOCKS = ("none", "text", "image", "both", "lora")
LORA_TOWERS = ("image", "text", "both")
VLM_FEATURES = ("pooled", "patches")


IMAGE_MODES = ("resize", "random", "grid", "block")  # train.schedule[].image_tokens.mode
TEXT_MODES = ("truncate", "random", "block", "syntax")  # train.schedule[].text_tokens.mode


@dataclass
class TeacherCfg:
    # registered name, "openclip:<arch>", "hf:<id|dir>", "text:<id|dir>" or a folder. Empty: the teacher
    # recorded in the cache (cache.dir), else DEFAULT_TEACHER; a teacher that is not named is never
    # loaded to fill rows a cache lacks.
    name: str = ""
    pretrained: Optional[str] = None  # open_clip tag or local weights file (open_clip backend)
    kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to the teacher loader


@dataclass
class StudentCfg:
    name: str = "vit_tiny"  # registered name, "timm:<name>", "hf:<id|dir>", or "image+text" (e.g. vit_tiny+bert_small)
    kwargs: dict[str, Any] = field(default_factory=dict)  # forwarded to create_student (pretrained, model_kwargs, ...)


@dataclass
class DataCfg:
    train: str = ""  # csv/tsv/json/jsonl of image,caption, or a folder
    image_size: Optional[int] = None  # student input size; None = the student's default
    augment: bool = True  # random-resized crops, the same crop replayed for teacher and student
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area range of the random crop (also of cache views)
    flip: bool = False  # random horizontal flips too (off: captions say "left" and "right"), as open_clip
    image_column: Optional[str] = None  # column/key holding the image path (auto-detected when None)
    caption_column: Optional[str] = None  # column/key holding the caption (auto-detected when None)
    num_workers: int = 2  # DataLoader workers decoding images
    packed: Optional[str] = None  # a store from `distill data pack`: read pre-resized bytes, not JPEGs
    # parallel sentences (a csv with one column per language): the teacher reads `parallel_source`, the
    # student learns each of `parallel_targets` onto it, and the source too. Empty: every other column
    # whose header is a language code (de, zh-cn) and whose values are sentences (never ids, paths, scores)
    parallel_source: Optional[str] = None
    parallel_targets: list[str] = field(default_factory=list)
    parallel_keep_source: bool = True  # also train source -> source, so the student keeps that language
    # batches of captions of similar token length (a text student pads far less; transformers' option)
    group_by_length: bool = False
    text_target: str = "caption"  # what a caption is learnt onto: caption (the teacher's text embedding of it)
    # or image (the teacher's embedding of its image: captions in a language the teacher cannot read)


@dataclass
class CacheCfg:
    dir: Optional[str] = None  # teacher embedding cache (distill cache build); None = run the teacher online
    allow_stale: bool = False  # use a cache built with another teacher identity / preprocessing anyway
    views: int = 1  # views per image when the cache is built (or extended) by the run itself
    dtype: str = "fp16"  # fp16 | fp32 storage of cache rows built by the run itself


@dataclass
class LossCfg:
    weights: dict[str, float] = field(default_factory=lambda: {"cosine": 1.0, "contrastive": 1.0})
    kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-loss options, e.g. {affinity: {tau: 0.1}}


@dataclass
class OptimCfg:
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes, CUDA only: 75% less optimiser memory)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    warmup_steps: int = 100  # linear warm-up, then cosine decay to min_lr_ratio * lr
    min_lr_ratio: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class TokensCfg:
    """What a stage feeds the student of one tower (``distill.tokens``); an empty mode = every token."""
    mode: str = ""  # image: resize | random | grid | block; text: truncate | random | block | syntax
    keep: float = 0.0  # image: fraction of the patch tokens (grid: 0.25); text: tokens kept besides special ones
    size: int = 0  # image resize: the side in pixels (instead of keep)
    tagger: str = "nltk"  # text syntax: nltk | textblob | spacy:<pipeline>


@dataclass
class StageCfg:
    steps: int = 0  # optimiser steps of this stage; the last stage may leave it 0 to run to train.max_steps
    image_tokens: TokensCfg = field(default_factory=TokensCfg)
    text_tokens: TokensCfg = field(default_factory=TokensCfg)


@dataclass
class TrainCfg:
    output_dir: str = "runs/distill"
    batch_size: int = 64  # per device, per micro-step
    max_steps: int = 1000  # optimiser steps
    grad_accum: int = 1  # micro-steps per optimiser step
    precision: str = "auto"  # auto | no | fp16 | bf16 (auto = bf16 on a GPU that has it, else fp32)
    seed: int = 0
    checkpoint_every: int = 0  # optimiser steps between checkpoints; 0 = only the final one
    keep_checkpoints: int = 2  # older checkpoints are deleted
    log_every: int = 10
    resume: bool = False  # continue from the last checkpoint in output_dir (of the same run)
    overwrite: bool = False  # start again in an output_dir that holds a run: its checkpoints and logs are deleted
    progress: bool = True  # progress reports: a live bar on a terminal, a plain line every 30 s in a log
    health_every: int = 200  # steps between health checks on a held-out slice; 0 = off
    health_rows: int = 256  # images held out for them (at most a tenth of the data; off below 32)
    cpu: bool = False  # force CPU even when a GPU is present
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, ~30% slower
    channels_last: bool = False  # NHWC memory format for CNN students (faster convs with autocast)
    compile: bool = False  # torch.compile the student (first steps are slow while it compiles)
    dist_timeout: int = 1800  # seconds a process waits for the others (several processes) before the run stops
    # stages with fewer tokens, e.g. [{steps: 4000, image_tokens: {mode: random, keep: 0.5}}, {steps: 500}]
    # (CLIPA); one learning-rate schedule over all of them; max_steps becomes the sum of their steps
    schedule: list[StageCfg] = field(default_factory=list)


@dataclass
class TuneCfg:
    lock: str = "none"  # contrastive tuning (distill tune): none | text (LiT) | image | both (heads only) | lora
    init_temperature: float = 0.07  # learnable softmax temperature of the CLIP loss
    embed_dim: int = 512  # shared space of the two towers' projection heads (when built from the recipe)
    queue: int = 0  # past embeddings of the locked tower kept as extra negatives (lock=text|image)
    unfreeze_last: int = 0  # the last N blocks of each locked trunk train too (lock=text|image|both)
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_towers: str = "both"  # image | text | both: towers that get adapters (lock=lora)
    lora_targets: list[str] = field(default_factory=list)  # module names; empty = every Linear of the tower


@dataclass
class VlmCfg:
    """A frozen tower as a language model's eyes (``distill adapt``): only the adapter (and optional LoRA) trains."""

    tower: str = ""  # the frozen vision tower: a saved teacher or student folder, or a run (load_student reads it)
    lm: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # causal LM: hub name, local folder, or a .gguf file
    gguf_file: Optional[str] = None  # a GGUF file inside vlm.lm's folder (or give the .gguf path as vlm.lm)
    features: str = "pooled"  # pooled: the tower's embedding -> prefix_tokens (ClipCap) | patches: one per patch (LLaVA)
    prefix_tokens: int = 8  # pooled: how many LM tokens the embedding becomes
    projector_hidden: int = 1024  # width of the projector MLP's hidden layer
    merge: int = 1  # patches: merge a merge x merge square of patches into one token (pixel shuffle)
    prompt: str = "Describe the photo in one sentence."  # the user turn that follows the image
    system: Optional[str] = None  # the system turn; None: the chat template's own
    chat_template: Optional[str] = None  # a Jinja chat template, for an LM whose tokenizer has none
    max_answer_tokens: int = 40  # answers (captions) are cut to this many tokens in training
    feature_noise: float = 0.0  # pooled: std of Gaussian noise on each feature in training (renormalised), as
    # CapDec: a regulariser on small data (benchmarks/vlm.py: 0.04 helped the teacher, not a swapped student)
    init_adapter: Optional[str] = None  # start from a saved adapter (a teacher's, tuned briefly on its student's tower)
    lm_lora: int = 0  # LoRA rank on the LM's attention projections (peft); 0: the LM stays frozen
    lm_lora_alpha: float = 16.0
    lm_lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class Recipe:
    teacher: TeacherCfg = field(default_factory=TeacherCfg)
    student: StudentCfg = field(default_factory=StudentCfg)
    data: DataCfg = field(default_factory=DataCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    tune: TuneCfg = field(default_factory=TuneCfg)
    vlm: VlmCfg = field(default_factory=VlmCfg)

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
