"""``distill adapt`` and ``distill caption``: a frozen tower as a language model's eyes."""
from __future__ import annotations

import argparse
import json
import sys

from .args import count


def add_parsers(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("adapt", help="train an adapter: a frozen tower as a frozen language model's eyes",
                       description="Trains a projector from a frozen image tower (vlm.tower: a saved teacher or "
                       "student) into a frozen causal LM (vlm.lm: a hub name, a local folder or a .gguf file) on "
                       "image-caption pairs (data.train), with the loss on the caption tokens only. The tower's "
                       "features are computed once (read from cache.dir when the tower is that cache's teacher; any other "
                       "tower's are kept in cache.dir/towers/ by photo content for later runs). "
                       "vlm.features=patches feeds patch tokens (vlm.merge=2: pixel shuffle); vlm.lm_lora=8 also "
                       "trains LoRA on the LM; vlm.init_adapter=DIR starts from another adapter (a teacher's, tuned "
                       "on its student). The adapter is written to <output_dir>/adapter. Example: distill adapt "
                       "recipes/vlm_smollm2_prefix.yaml vlm.tower=runs/teacher/model data.train=captions.csv")
    a.add_argument("recipe", nargs="?", help="recipe YAML (only what differs from the defaults)")
    a.add_argument("overrides", nargs="*", help="section.key=value (values parsed as YAML)")
    a.set_defaults(run=run_adapt)

    c = sub.add_parser("caption", help="caption photos (or answer a prompt about them) with a saved adapter",
                       description="Generates one answer per photo through the adapter's tower and LM (or --tower: "
                       "a student of the teacher it was trained on reads it too; another tower is refused, naming the "
                       "field). Photos that cannot be opened are skipped and listed.")
    c.add_argument("adapter", help="an adapter folder (distill adapt's <output_dir>/adapter, or the run folder)")
    c.add_argument("photos", nargs="+", help="photos, folders (recursive) or a data file with an image column")
    c.add_argument("--tower", help="the tower to look through (default: the one the adapter names)")
    c.add_argument("--image-size", type=count(16, 4096), default=None,
                   help="run the tower at this input size (a CNN takes any; smaller is cheaper, in the same space)")
    c.add_argument("--lm", help="the LM (default: the one the adapter names)")
    c.add_argument("--prompt", help="another question than the one the adapter was trained with")
    c.add_argument("--max-new-tokens", type=count(1, 4096), default=40)
    c.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    c.add_argument("--temperature", type=_above_zero, default=0.7, help="with --sample (> 0)")
    c.add_argument("--top-p", type=_share, default=0.9, help="with --sample, in (0, 1]")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=count(1, 4096), default=16)
    c.add_argument("--json", action="store_true", help="print one JSON object per photo")
    c.set_defaults(run=run_caption)


def _above_zero(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0 (drop --sample for greedy decoding)")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{text} must be in (0, 1]")
    return value


def run_adapt(args: argparse.Namespace) -> int:
    from ..config import load_recipe
    from ..vlm import AdapterTrainer

    path = args.recipe if args.recipe and "=" not in args.recipe else None  # overrides alone are a recipe too
    recipe = load_recipe(path, ([args.recipe] if args.recipe and path is None else []) + args.overrides)
    result = AdapterTrainer(recipe=recipe).fit()
    print(f"final loss {result.history['loss'][-1]:.4f} after {result.steps} steps; adapter: {result.model_dir}")
    return 0


def run_caption(args: argparse.Namespace) -> int:
    from ..vlm import VisionTower, caption_images, load_vlm

    vlm = load_vlm(args.adapter, lm_name=args.lm)
    tower = args.tower or vlm.vision.get("path")
    if args.image_size is not None and tower:  # without a tower, caption_images says what to pass
        tower = VisionTower.load(tower, vlm.vision.get("features", "pooled"), image_size=args.image_size)
    out = caption_images(vlm, args.photos, tower=tower, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                         sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                         batch_size=args.batch_size, seed=args.seed)
    for path, text in zip(out.paths, out.captions):
        print(json.dumps({"photo": path, "caption": text}, ensure_ascii=False) if args.json else
              f"{path}\t{' '.join(text.split())}")  # one line per photo
    for path, why in out.skipped.items():
        print(f"skipped {path}: {why}", file=sys.stderr)
    return 0
