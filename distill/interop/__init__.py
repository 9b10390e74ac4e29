"""Students as other libraries' own folders: open_clip (``local-dir:``), sentence-transformers and
timm / transformers (TimmWrapper). Each module writes one client's layout and reads it back with
that client for the export parity gate (:func:`distill.export.export`)."""
