"""Small file helpers: atomic writes (temp file + rename) and JSON."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_format_json(path: str | Path, expected: str, hint: str) -> Any:
    """Read a JSON file that names its ``format``: fails naming the folder when it is missing
    (with ``hint`` on what makes one) and naming the file when it holds another format."""
    from .errors import FileFormatError, MissingFileError

    path = Path(path)
    if not path.exists():
        what = "no such folder" if not path.parent.exists() else f"no {path.name}"
        raise MissingFileError(f"{path.parent}: {what}; {hint}")
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{path}: cannot be read ({e})") from None
    if not isinstance(data, dict) or data.get("format") != expected:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise FileFormatError(f"{path}: format {found!r}, expected {expected!r}")
    return data


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors made contiguous and detached)."""
    from safetensors.torch import save

    clean = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path: str | Path, device: str = "cpu") -> dict:
    from safetensors.torch import load_file

    return load_file(str(path), device=device)
