"""The teacher service: run the frozen teacher once over the data and keep its embeddings on disk.

Layout of a cache folder::

    manifest.json                teacher identity, preprocessing, view policy, dtype, counts, checksums, fingerprint
    images/shard_00000.npy       [n, K, D] image embeddings, K views per image (fp16 by default)
    images/shard_00000.views.npy [n, K, 5] the views (x0, y0, w, h, flip) as fractions of the image
    images/shard_00000.json      keys, real paths and stats of the rows, skipped images, build key, checksums
    texts/shard_00000.npy        [n, D] caption embeddings
    texts/shard_00000.json
    skipped.jsonl                every image or caption that was skipped, with the reason
    towers/<id>/part-*.safetensors  other frozen towers' features by image key (``towers``: distill adapt)

Images are keyed by their content (``keys``), captions by their text. View 0 is the teacher's own eval
transform; views 1..K-1 are random-resized crops (and flips when asked) whose parameters depend only on
(seed, image key, view), so a student replays exactly the same crop at its own resolution.

Modules: ``keys`` (what identifies a row), ``build`` (``TeacherService``), ``store`` (manifest, shards,
``EmbeddingCache``), ``dataset`` (training from a cache), ``towers`` (``TowerFeatures``).
"""
from .._lazy import lazy
from ..errors import CacheError, CacheMismatchError, CacheMissError

# imported when first used: the keys (content hashes) serve the torch-free photo index too
__getattr__ = lazy(__name__, {**dict.fromkeys(("BuildSummary", "TeacherService", "view_for"), ".build"),
                              **dict.fromkeys(("CachedPairDataset", "Lookup", "cached_collate", "lookup", "missing_error"),
                                              ".dataset"),
                              **dict.fromkeys(("KeyIndex", "image_keys", "text_key"), ".keys"),
                              **dict.fromkeys(("DTYPES", "FORMAT", "EmbeddingCache", "compare"), ".store"),
                              "TowerFeatures": ".towers"})

__all__ = ["TeacherService", "BuildSummary", "EmbeddingCache", "CachedPairDataset", "cached_collate", "lookup",
           "Lookup", "missing_error", "image_keys", "text_key", "KeyIndex", "view_for", "compare", "FORMAT",
           "DTYPES", "TowerFeatures", "CacheError", "CacheMismatchError", "CacheMissError"]
