"""Image bytes, one way for every consumer: decoding for training, ``distill data check``, cache keys.

An image is a plain file, a member of a webdataset tar (``<tar>::<member>``) or a row of a Hugging Face
dataset (``hf://<source>@<split>#<column>/<row>``). Tar handles and datasets are kept open per process in
small least-recently-used caches: a handle that falls out is closed, so thousands of shards never reach
the file-descriptor limit.
"""
from __future__ import annotations

import io
import os
import stat
from collections import OrderedDict
from typing import Any

from ..errors import DataError
from ..transforms import to_rgb

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# The rules `distill data check` rejects images by, and training and cache builds skip them by.
MIN_SIDE = 16  # pixels: smaller images carry no usable content at any student size
MAX_PIXELS = 89_478_485  # PIL's decompression-bomb limit


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a bad or missing image raises (a bug in our own reader raises something else)."""
    from PIL import Image, UnidentifiedImageError

    return (OSError, ValueError, EOFError, SyntaxError, UnidentifiedImageError, Image.DecompressionBombError,
            DataError)


def image_problem(width: int, height: int, min_side: int = MIN_SIDE, max_pixels: int = MAX_PIXELS) -> str | None:
    """Why an image of this size is not used (None when it is fine): one rule for check, fit and cache."""
    if min(width, height) < min_side:
        return f"image too small ({width}x{height}, under {min_side} px)"
    if width * height > max_pixels:
        return f"image too large ({width}x{height}, over {max_pixels} pixels)"
    return None


def is_member(path: str) -> bool:
    """A tar member or a dataset row, not a plain file."""
    return "::" in path or path.startswith("hf://")


class _LRU(OrderedDict):
    """Open handles, the least recently used closed when more than ``size`` are open."""

    def __init__(self, size: int, close=lambda value: None):
        super().__init__()
        self.size, self._close = size, close
        self.pid = os.getpid()

    def get_or_open(self, key: Any, opener) -> Any:
        if self.pid != os.getpid():  # a forked DataLoader worker opens its own
            self.clear()
            self.pid = os.getpid()
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = opener()
        while len(self) > self.size:
            self._close(self.popitem(last=False)[1])
        return value

    def close_all(self) -> None:
        while self:
            self._close(self.popitem(last=False)[1])


_TARS = _LRU(64, close=lambda tar: tar.close())
_DATASETS = _LRU(4)


def hf_dataset(source: str, split: str):
    """A Hugging Face dataset (a local ``save_to_disk`` folder or a hub name), kept open while in use."""

    def load():
        import datasets

        if os.path.isdir(source):
            ds = datasets.load_from_disk(source)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        return datasets.load_dataset(source, split=split)

    return _DATASETS.get_or_open((source, split), load)


def image_source(path: str):
    """A binary file-like object with the image's bytes (a decoded PIL image for a dataset that stores
    them decoded); raises what a missing or unreadable file raises."""
    if path.startswith("hf://"):
        source, _, rest = path[5:].rpartition("@")
        split, _, col_row = rest.partition("#")
        col, _, row = col_row.rpartition("/")
        value = hf_dataset(source, split)[int(row)][col]
        if hasattr(value, "convert"):  # datasets.Image decodes to PIL already
            return value
        if isinstance(value, dict):
            if value.get("bytes"):
                value = value["bytes"]
            else:
                with open(value["path"], "rb") as f:
                    value = f.read()
        return io.BytesIO(value)
    if "::" in path:
        import tarfile

        tar_path, member = path.split("::", 1)
        try:
            f = _TARS.get_or_open(tar_path, lambda: tarfile.open(tar_path)).extractfile(member)
        except KeyError:
            f = None
        if f is None:
            raise FileNotFoundError(f"{path}: no such member")
        return io.BytesIO(f.read())
    if os.path.exists(path) and not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file")  # a pipe would block the reader
    return open(path, "rb")


def image_bytes(path: str) -> bytes:
    """The image's bytes (a decoded dataset image: its mode, size and pixels)."""
    src = image_source(path)
    if hasattr(src, "convert"):
        return f"{src.mode}{src.size}".encode() + src.tobytes()
    with src:
        return src.read()


def open_image(path: str, check: bool = False):
    """Open and fully decode an image (raises on missing/corrupt files); RGB, alpha on white. ``check``: raise
    ``DataError`` for a too small or too large image (``image_problem``) from its header, before decoding it."""
    from PIL import Image

    src = image_source(path)
    if hasattr(src, "convert"):
        if check and image_problem(*src.size):
            raise DataError(image_problem(*src.size))
        src.load()
        return to_rgb(src)
    with src, Image.open(src) as im:
        if check and image_problem(*im.size):
            raise DataError(image_problem(*im.size))
        im.load()
        return to_rgb(im)


def read_problem(path: str, error: BaseException) -> str:
    """Why an image could not be read, worded as ``distill data check`` words it."""
    plain = "::" not in path and not path.startswith("hf://")
    if plain and not os.path.exists(path):
        return "missing file"
    if plain and not os.path.isfile(path):
        return "not a regular file"
    if plain and os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(error, DataError):  # open_image(check=True): what is wrong with it, in words
        return str(error)
    return f"corrupt or truncated image ({type(error).__name__}: {str(error)[:120]})"


class RawImages:
    """Decodes the original files: ``open(path) -> (RGB PIL image, (width, height))``."""

    def open(self, path: str):
        image = open_image(path)
        return image, image.size


def usable_image(path: str, reader: Any = None) -> str | None:
    """Why the image at ``path`` is not used (None when it is): decoded once, checked by size."""
    try:
        _, size = (reader or RawImages()).open(path)
    except read_errors() as e:
        return read_problem(path, e)
    return image_problem(*size)


def stat_problem(path: str) -> str | None:
    """Why a plain file cannot be read, from its stat alone (None for members and readable files)."""
    if is_member(path):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return "missing file"
    if not stat.S_ISREG(st.st_mode):  # a folder, a pipe, a device: reading could block or fail
        return "not a regular file"
    return "empty file (0 bytes)" if st.st_size == 0 else None
