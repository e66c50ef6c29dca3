"""Atomic file writes (a reader sees the old file or the new one, never half of one), and URIs told from paths."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def is_uri(location: str | Path) -> bool:
    """True for a URI (``s3://``, ``gs://``, ``sqlite:///``, ``file://``...), False for a plain path."""
    return "://" in str(location)


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
