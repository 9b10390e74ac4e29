"""A student as a language model's eyes: a frozen image tower (teacher or student), a trained adapter, a frozen
causal LM (hub name, folder or GGUF file; LoRA optional).

    from distill.vlm import AdapterTrainer, load_vlm, caption_images

    AdapterTrainer(tower="runs/teacher/model", lm="path/to/SmolLM2-135M-Instruct.Q4_1.gguf",
                   max_steps=1000, output_dir="runs/vlm").fit("captions.csv")
    vlm = load_vlm("runs/vlm/adapter")
    caption_images(vlm, "photos/", tower="runs/student").captions   # a student of that teacher: swapped

The parts, in the order data flows: ``tower`` (what features a tower gives and which space they live in),
``lm`` (the LM, its identity, its chat template around the image), ``adapter`` (the projector, saved and
checked), ``model`` (the prompt, the answer-only loss, generation), ``train`` (``distill adapt``),
``caption`` (``distill caption``).
"""
from .adapter import Projector, pixel_shuffle, read_adapter
from .caption import Captions, caption_images, photo_paths, tower_features
from .lm import ChatPrompt, lm_identity, load_lm
from .model import IGNORE, VisionLanguageModel, load_vlm
from .tower import VisionTower, check_tower
from .train import AdapterStep, AdapterTrainer

__all__ = ["AdapterTrainer", "AdapterStep", "VisionLanguageModel", "load_vlm", "caption_images", "Captions",
           "VisionTower", "check_tower", "load_lm", "lm_identity", "ChatPrompt", "Projector", "pixel_shuffle",
           "read_adapter", "photo_paths", "tower_features", "IGNORE"]
