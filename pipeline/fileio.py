"""Atomic file writes (a reader sees the old file or the new one, never half of one), output directories
checked before any work, and URIs told from paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from pipeline.errors import UserError


def is_uri(location: str | Path) -> bool:
    """True for a URI (``s3://``, ``gs://``, ``sqlite:///``, ``file://``...), False for a plain path."""
    return "://" in str(location)


def make_writable_dir(path: str | Path, name: str) -> Path:
    """Create directory ``path`` (and its parents) unless it exists, and check it can be written to; a
    ``UserError`` naming it as ``name`` (``OUT_DIR``, ``run.storage_path``) otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{name} {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create {name} {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{name} {path} is not writable")
    return path


def write_atomic(path: str | Path, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, then rename it over ``path``.

    The temporary file is removed if ``write`` fails, so nothing half-written is left behind.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
