"""Image-text data: rows from any source (``sources``), image bytes and decoding (``images``), the dataset and
collate a training step reads (``dataset``), the batch order (``sampler``) and the pipeline that puts them
together for a run (``pipeline``).

Data flows one way: a source gives ``Rows``; the pipeline turns rows into batches; nothing here imports the
models, the cache or the trainer.
"""
from __future__ import annotations

from .._compat import forward
from .._lazy import lazy
from .images import (IMAGE_EXTS, MAX_PIXELS, MIN_SIDE, RawImages, image_bytes, image_problem, image_source, is_member,
                     open_image, read_errors, read_problem, stat_problem, usable_image)
from .rows import Rows, split_usable
from .sources import (CAPTION_KEYS, IMAGE_FOLDERS, IMAGE_KEYS, LABEL_KEYS, LAYOUTS, SOURCES, Source, as_rows,
                      load_parallel, load_rows, pair_by_image, photo_paths, read_text_file, register_source,
                      write_parallel)


# the dataset and the sampler import torch: reading rows and image bytes does not (the ONNX search needs no torch)
__getattr__ = lazy(__name__, {"PairDataset": ".dataset", "make_collate": ".dataset", "EpochBatchSampler": ".sampler",
                              "make_loader_factory": ".sampler"},
                   then=forward(__name__, "distill.run", {"SkipLog": "SkipLog"}))  # SkipLog moved: one more release

__all__ = ["Rows", "load_rows", "as_rows", "photo_paths", "load_parallel", "pair_by_image", "write_parallel",
           "split_usable", "open_image", "image_source",
           "image_bytes", "read_problem", "read_errors", "stat_problem", "usable_image", "image_problem", "is_member",
           "RawImages", "PairDataset", "make_collate", "EpochBatchSampler", "make_loader_factory", "SOURCES", "Source", "register_source",
           "read_text_file", "IMAGE_EXTS", "IMAGE_KEYS", "CAPTION_KEYS", "LABEL_KEYS", "IMAGE_FOLDERS", "LAYOUTS",
           "MIN_SIDE", "MAX_PIXELS"]
