"""``distill fit`` and ``distill tune``: a recipe YAML with ``key=value`` overrides."""
from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fit", help="distil a student from a recipe",
                       description="Distil from a recipe YAML. Overrides use dotted keys: "
                       "distill fit recipes/vit_tiny_from_vit_b32.yaml train.lr=1e-4 data.train=my.csv")
    f.add_argument("recipe", help="recipe YAML (only the fields that differ from the defaults)")
    f.add_argument("overrides", nargs="*", help="section.key=value (values parsed as YAML)")
    f.add_argument("--allow-stale", action="store_true", help="use a cache built with another teacher/preprocessing")
    f.set_defaults(run=cmd_fit)
    t = sub.add_parser("tune", help="contrastively tune a two-tower model from a recipe",
                       description="CLIP loss with a learnable temperature; tune.lock=text (LiT)|image|both (heads "
                       "only, on trunk features computed once)|lora|none; tune.unfreeze_last=N also trains the last N "
                       "blocks of the locked trunks. The student section names the two-tower model (e.g. "
                       "resnet18+hf:minilm, efficientnet_lite2+hf:minilm with image_kwargs {pretrained: true}, "
                       "openclip:ViT-B-32+bert_small) and tune.embed_dim its shared space; the result in "
                       "<output_dir>/model loads with load_teacher().")
    t.add_argument("recipe")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(run=cmd_tune)


def cmd_fit(args) -> int:
    from ..config import load_recipe
    from ..trainer import Distiller

    recipe = load_recipe(args.recipe, args.overrides + (["cache.allow_stale=true"] if args.allow_stale else []))
    result = Distiller(recipe=recipe).fit()
    print(f"final loss {result.history['loss'][-1]:.4f} after {result.steps} steps; student: {result.model_dir}")
    return 0


def cmd_tune(args) -> int:
    from ..config import load_recipe
    from ..tune import Tuner

    recipe = load_recipe(args.recipe, args.overrides)
    result = Tuner(recipe=recipe).fit()
    print(f"final loss {result.history['loss'][-1]:.4f}; model: {result.model_dir} (load_teacher() loads it)")
    return 0
