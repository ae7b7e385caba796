"""Atomic, standard-conforming file output: nothing half-written survives a killed run."""
from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:  # (pandas costs seconds to import; write_csv only calls the frame's method)
    import pandas as pd


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is fsynced and renamed onto ``path``.

    On any exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp creates 0600; give the usual permissions
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(value: Any) -> Any:
    """Recursively replace non-finite floats by None so the output is standard JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write standard JSON atomically (no ``Infinity``/``NaN`` tokens: those become ``null``)."""
    with atomic_open(path) as handle:
        json.dump(json_safe(data), handle, indent=1, allow_nan=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any | None:
    """Return the parsed file, or None when it is missing or not valid JSON (e.g. truncated)."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def write_csv(path: str | os.PathLike, frame: pd.DataFrame) -> None:
    """Write a data frame as CSV atomically."""
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False)


def write_bytes_atomic(path: str | os.PathLike, write: Callable[[IO], None]) -> None:
    """Call ``write(handle)`` on a binary temporary file, then rename it onto ``path``."""
    with atomic_open(path, "wb") as handle:
        write(handle)


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and check that files can be created in it.

    Raises:
        OSError: with a one-line message when the directory cannot be used.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"cannot write to output directory '{path}': {error.strerror or error}") from None
    return path


class OutputPathError(ValueError):
    """An output path that cannot be written (one-line message)."""


def check_output_path(path: str | os.PathLike, kind: str = "file") -> Path:
    """Check, without creating anything, that ``path`` can be written as a ``kind`` (``"file"`` or ``"dir"``).

    The path itself may be missing (it and its missing parent folders are created when the
    output is written), but it must not be of the other kind, and its nearest existing ancestor
    must be a writable folder. Call it before a long computation, so that a bad output path
    fails at once rather than after the work.

    Raises:
        OutputPathError: with a one-line reason.
    """
    if kind not in ("file", "dir"):
        raise ValueError(f"kind must be 'file' or 'dir', got {kind!r}")
    path = Path(path)
    if path.exists():
        if kind == "file" and path.is_dir():
            raise OutputPathError(f"'{path}' is a folder, not a file")
        if kind == "dir" and not path.is_dir():
            raise OutputPathError(f"'{path}' is a file, not a folder")
        folder = path if kind == "dir" else (path.parent if str(path.parent) else Path("."))
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputPathError(f"cannot write to '{path}': no write permission in '{folder}'")
        return path
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputPathError(f"cannot create '{path}': '{ancestor}' is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot create '{path}': no write permission in '{ancestor}'")
    return path
