"""Prompt templates for zero-shot classification.

``IMAGENET_TEMPLATES``: the 80 prompts OpenAI used for CLIP's ImageNet zero-shot evaluation
(as open_clip ships them). ``{}`` is replaced by the class name.
"""

IMAGENET_TEMPLATES = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SIMPLE_TEMPLATES = ("a photo of a {}.",)


def load_templates(spec: str | None) -> tuple[str, ...]:
    """``None``/``"imagenet"`` -> the 80 CLIP prompts; ``"simple"``; else a text file, one template per line."""
    if spec in (None, "imagenet"):
        return IMAGENET_TEMPLATES
    if spec == "simple":
        return SIMPLE_TEMPLATES
    from pathlib import Path

    from .data import read_text_file
    from .errors import DataError, DataNotFoundError

    if not Path(spec).is_file():
        raise DataNotFoundError(f"--templates {spec}: not imagenet, simple or a file of templates")
    lines = [line.strip() for line in read_text_file(spec).splitlines() if line.strip()]
    if not lines:
        raise DataError(f"{spec}: no templates in the file (one per line, each with a {{}} for the class name)")
    bad = [line for line in lines if "{}" not in line]
    if bad:
        raise DataError(f"{spec}: template without a {{}} placeholder: {bad[0]!r}")
    return tuple(lines)
