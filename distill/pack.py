"""Moved to :mod:`distill.data.packed` (a packed store is one of the data package's image readers)."""
from ._compat import forward

__getattr__ = forward(__name__, "distill.data.packed", {"pack_images": "pack_images", "PackedImages": "PackedImages",
                                                         "PackSummary": "PackSummary", "PACK_FORMAT": "PACK_FORMAT"})
