"""Small file helpers: atomic writes (temp file + rename) and JSON."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, then rename it into place. The file
    gets the permissions ``open()`` would give it (mkstemp's are owner-only: others could not read a
    shared cache or model)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
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


def json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path``, or ``{}`` when it is missing, unreadable or not an object: for telling
    what a folder holds, where a damaged file is named later by whoever reads it."""
    try:
        data = read_json(path)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def read_format_json(path: str | Path, expected: str, hint: str, accept=None) -> Any:
    """Read a JSON file that names its ``format``: fails naming the folder when it is missing
    (with ``hint`` on what makes one) and naming the file when it holds another format
    (``accept(data)`` True lets another layout through, for the caller to read)."""
    from .errors import FileFormatError, MissingFileError

    path = Path(path)
    if not path.exists():
        what = "no such folder" if not path.parent.exists() else f"no {path.name}"
        raise MissingFileError(f"{path.parent}: {what}; {hint}")
    try:
        data = read_json(path)
    except (OSError, ValueError) as e:
        raise FileFormatError(f"{path}: cannot be read ({e})") from None
    if isinstance(data, dict) and accept is not None and accept(data):
        return data
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
    """A safetensors file's tensors; a missing or damaged file names itself."""
    from safetensors.torch import load_file

    from .errors import FileFormatError, MissingFileError

    if not Path(path).is_file():
        raise MissingFileError(f"{path}: no such file")
    try:
        return load_file(str(path), device=device)
    except Exception as e:  # truncated, header damaged, not safetensors
        raise FileFormatError(f"{path}: cannot be read as safetensors ({type(e).__name__}: {str(e)[:100]}); "
                              "the file is damaged: save or export it again") from None


def file_digest(path: str | Path, algo: str = "sha256") -> str:
    """Hex digest of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def portable_teacher(identity: dict[str, Any] | None, folder: str | Path) -> dict[str, Any] | None:
    """A teacher identity as a config in ``folder`` records it: a teacher folder's path relative to ``folder``,
    so that a copied or moved student names no path of the machine that wrote it."""
    if not identity or not identity.get("path"):
        return identity
    try:
        rel = os.path.relpath(os.path.abspath(identity["path"]), os.path.abspath(folder))
    except ValueError:  # another drive (Windows): no relative form
        return identity
    return {**identity, "path": Path(rel).as_posix()}


def resolved_teacher(identity: dict[str, Any] | None, folder: str | Path) -> dict[str, Any] | None:
    """The identity :func:`portable_teacher` wrote, its teacher path resolved against ``folder`` again."""
    if not identity or not identity.get("path") or os.path.isabs(identity["path"]):
        return identity
    return {**identity, "path": os.path.normpath(os.path.join(os.path.abspath(folder), identity["path"]))}


def cache_root() -> Path:
    """The one clip-distill cache folder: $CLIP_DISTILL_CACHE, else $XDG_CACHE_HOME/clip-distill (~/.cache)."""
    return Path(os.environ.get("CLIP_DISTILL_CACHE",
                               Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "clip-distill")).expanduser()
