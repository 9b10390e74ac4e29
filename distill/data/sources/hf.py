"""``hf:<local dataset dir or hub name>[@split]``: a Hugging Face ``datasets`` dataset, its image and text
columns found or named (``image_column`` / ``caption_column``). Images are ``hf://<source>@<split>#<column>/<row>``."""
from __future__ import annotations

from ...errors import DataError
from ..images import hf_dataset
from ..rows import Rows
from .records import CAPTION_KEYS, IMAGE_KEYS, pick_column
from .registry import Source, register_source


def read_hf(spec: str, image_column: str | None, caption_column: str | None) -> Rows:
    """``hf:<dir or hub name>[@split]``: a Hugging Face dataset (needs ``pip install datasets``)."""
    from ..._imports import require

    require("datasets", "Hugging Face datasets as a data source")
    source, _, split = spec.partition("@")
    ds = hf_dataset(source, split or "train")
    cols = list(ds.column_names)
    ik = pick_column(cols, image_column, IMAGE_KEYS, "image", f"hf:{spec}")
    ck = pick_column(cols, caption_column, CAPTION_KEYS, "caption", f"hf:{spec}")
    if ik is None and ck is None:
        raise DataError(f"hf:{spec}: found neither an image column nor a caption column; columns are {cols}; "
                        "name them with data.image_column / data.caption_column")
    caps = ds[ck] if ck else [None] * len(ds)
    images, captions = [], []
    for i, c in enumerate(caps):
        for one in (c if isinstance(c, list) else [c]):
            images.append(f"hf://{source}@{split or 'train'}#{ik}/{i}" if ik else None)
            captions.append(None if one is None else str(one).strip())
    return Rows(images, captions, source=f"hf:{spec}", layout="a Hugging Face dataset")


register_source(Source("hf", lambda s: s.startswith("hf:"), lambda s, ic, cc: read_hf(s[3:], ic, cc)))
