"""Shared fixtures: small, meaningful local data and one local Ray cluster per test session.

Label-encoding images: every pixel of an image of class ``c`` has the value
``label_value(c)``, so any loader's output can be checked against ``cls`` by
reading the pixels back (robust to JPEG error, crops, flips and resizes).
"""

from __future__ import annotations

import contextlib
import multiprocessing.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

FMNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
_RUN_TMP: Path | None = None


def pytest_configure(config) -> None:
    """One temp directory for the whole run, this process's and every process it starts (``TMPDIR``).

    What the tested tools leave in a temp dir by design (Ray's session logs, MLflow's SQLite init
    locks, multiprocessing's and torchrun's directories) and pytest's own ``tmp_path`` trees land
    there; a run that passes removes it, a failing run keeps it and says where. Short, under /tmp:
    Ray's Unix socket paths have a length limit.
    """
    global _RUN_TMP
    _RUN_TMP = Path(tempfile.mkdtemp(prefix="pt-", dir="/tmp"))
    os.environ["TMPDIR"] = str(_RUN_TMP)
    os.environ.pop("RAY_TMPDIR", None)  # Ray would read it before TMPDIR
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def pytest_sessionfinish(session, exitstatus) -> None:
    if _RUN_TMP is None:
        return
    if exitstatus == 0:
        # At exit, after multiprocessing has removed its own directory in it (its exit priority is -100).
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(str(_RUN_TMP),), kwargs={"ignore_errors": True},
                                      exitpriority=-200)
    else:
        print(f"\ntemp files of this run kept: {_RUN_TMP}")


def label_value(label: int, num_classes: int = 10) -> int:
    """Grey level that encodes ``label``: evenly spaced in 0..255, far apart for JPEG error."""
    return int(round(label * 255 / max(num_classes - 1, 1)))


def label_from_pixels(mean_value: float, num_classes: int = 10) -> int:
    """Inverse of ``label_value`` on an image's mean grey level (0..255)."""
    return int(round(mean_value * max(num_classes - 1, 1) / 255))


@contextlib.contextmanager
def temp_dir_under_tmp(prefix: str = "pl-") -> Iterator[Path]:
    """A new directory right under /tmp, removed afterwards: a TMPDIR for a job that starts a Ray of its own.

    pytest's own temp paths can be too long for Ray's Unix socket paths; the default prefix gives a short
    one, a long prefix a long one. Removing it removes that Ray's session logs too.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def make_label_folder(
    root: Path,
    classes: list[str],
    per_class: int | list[int],
    size: tuple[int, int] = (48, 40),
    ext: str = ".jpg",
) -> Path:
    """ImageNet-style folder ``root/<class>/<n><ext>`` of flat images encoding their label."""
    counts = per_class if isinstance(per_class, list) else [per_class] * len(classes)
    for label, (name, count) in enumerate(zip(classes, counts)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        v = label_value(label, len(classes))
        for i in range(count):
            img = Image.fromarray(np.full((size[1], size[0], 3), v, dtype=np.uint8))
            fmt = "PNG" if ext.lower() == ".png" else "JPEG"
            img.save(d / f"img_{i:04d}{ext}", format=fmt, quality=95)
    return root


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    """Real Fashion-MNIST idx files (Debian package dataset-fashion-mnist; `make data` installs it)."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(
            f"Fashion-MNIST not found under {FMNIST_DIR}: run `make data` "
            "(apt-get install dataset-fashion-mnist) or set FASHION_MNIST_DIR"
        )
    return FMNIST_DIR


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster (2 CPUs, no dashboard) shared by every test that needs Ray."""
    import ray  # a hard dependency: a broken install fails the tests that need it

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()
