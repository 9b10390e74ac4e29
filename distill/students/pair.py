"""Moved to :mod:`distill.interop.pair` (pairing is what an open_clip export of an image student needs)."""
from .._compat import forward

__getattr__ = forward(__name__, "distill.interop.pair", {"pair_with_teacher_text": "pair_with_teacher_text"})
