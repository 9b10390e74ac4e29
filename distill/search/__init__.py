"""Search photos with a student: index a folder (or any data source) once, then search it by text or by an
example photo, from Python, the CLI (``distill index`` / ``distill search`` / ``distill serve``) or a small
local web page. An ONNX export is enough: nothing here imports torch unless the model is a PyTorch folder.

    >>> from distill.search import index_photos, search_photos
    >>> index_photos("~/Pictures", "photos.index", model="exported/lite0_int8")
    >>> for hit in search_photos("photos.index", "a dog running on the grass", k=5).hits:
    ...     print(f"{hit.score:.3f} {hit.path}")
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .encoders import Encoder, OnnxEncoder, TorchEncoder, open_encoder
from .index import FORMAT, Hit, IndexSummary, PhotoIndex, index_photos, photo_paths

UNKNOWN_NOTE = 0.25  # a query with this share of tokens unknown to the text tower gets a note


@dataclass
class SearchResult:
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)


class Searcher:
    """An open index and the model that queries it (the one recorded at build time unless ``model`` is
    given): ``text(query)`` and ``image(photo)`` give the top ``k`` photos with their cosine scores."""

    def __init__(self, index: str | os.PathLike | PhotoIndex, model: str | os.PathLike | Encoder | None = None,
                 device: str = "cpu"):
        from ..errors import PhotoIndexError

        self.index = index if isinstance(index, PhotoIndex) else PhotoIndex(index)
        if model is None:
            model = self.index.model_path()
            if model is None:
                raise PhotoIndexError(f"{self.index.folder}: the model that built it "
                                      f"({self.index.model.get('name')}, recorded as {self.index.model.get('path')} "
                                      "from the index folder) is not there: pass --model")
        self.encoder = model if isinstance(model, Encoder) else open_encoder(model, device=device)

    def text(self, query: str, k: int = 10) -> SearchResult:
        self.index.check_model(self.encoder, "text")
        notes = []
        share = self.encoder.unknown_share(query)
        if share >= UNKNOWN_NOTE:
            notes.append(f"{share:.0%} of the query's tokens are unknown to {self.encoder.name}'s tokenizer (a "
                         "language or script its text tower was not trained on): the results may not mean much")
        return SearchResult(self.index.search(self.encoder.encode_texts([query]), k)[0], notes)

    def image(self, photo: Any, k: int = 10) -> SearchResult:
        """Photos like ``photo`` (a path, a PIL image, or the content key of an indexed photo)."""
        from ..data import open_image

        if isinstance(photo, str) and not os.path.exists(photo):
            vector = self.index.vector_of(photo)
            if vector is not None:
                return SearchResult(self.index.search(vector, k)[0])
        self.index.check_model(self.encoder, "image")
        im = photo if hasattr(photo, "convert") else open_image(str(photo))
        return SearchResult(self.index.search(self.encoder.encode_images([im]), k)[0])


def search_photos(index: str | os.PathLike, text: str | None = None, image: Any = None,
                  model: str | os.PathLike | Encoder | None = None, k: int = 10) -> SearchResult:
    """The top ``k`` photos of ``index`` for a text query or an example photo (one of the two)."""
    if (text is None) == (image is None):
        raise ValueError("give a text query or an example photo (one of the two)")
    searcher = Searcher(index, model)
    return searcher.text(text, k) if text is not None else searcher.image(image, k)


__all__ = ["PhotoIndex", "Hit", "IndexSummary", "SearchResult", "Searcher", "index_photos", "search_photos",
           "photo_paths", "open_encoder", "Encoder", "OnnxEncoder", "TorchEncoder", "FORMAT"]
