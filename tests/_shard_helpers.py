"""Generated inputs for the shard builder tests: a messy image folder and CIFAR-10 batches."""

from __future__ import annotations

import io
import os
import pickle
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from conftest import label_value, make_label_folder

CLASSES = ["cat", "dog", "épée bird"]  # non-ASCII and a space in a class name
GOOD_PER_CLASS = 4

# name → reason kind expected in index.json "skipped"
BAD_INPUTS = {
    "dog/empty.jpg": "empty file",
    "dog/notes.JPEG": "not an image",
    "dog/truncated.jpg": "undecodable",
    "dog/readme.txt": "not an image file extension",
    "cat/huge.png": "too many pixels",
}
MAX_PIXELS = 1_000_000  # huge.png is 1200x1000


def _solid(v: int, size=(40, 32), mode="RGB") -> Image.Image:
    return Image.fromarray(np.full((size[1], size[0], 3), v, dtype=np.uint8)).convert(mode)


def make_messy_folder(root: Path) -> tuple[Path, int]:
    """Image folder with good, convertible and bad inputs; returns (root, number of storable images)."""
    make_label_folder(root, CLASSES, GOOD_PER_CLASS, ext=".jpg")
    n = GOOD_PER_CLASS * len(CLASSES)
    cat, dog, bird = (label_value(i, len(CLASSES)) for i in range(3))
    # Inputs that must be converted to RGB (ImageNet has each of these), all encoding their label.
    (root / "cat" / "sub dir").mkdir()
    _solid(cat).save(root / "cat" / "sub dir" / "nested ünïcode.JPG", quality=95)
    _solid(cat, mode="CMYK").save(root / "cat" / "cmyk.jpg", quality=95)
    _solid(cat, mode="L").save(root / "cat" / "grey.jpeg", quality=95)
    _solid(bird).save(root / "épée bird" / "progressive.jpg", quality=95, progressive=True)
    Image.fromarray(np.full((32, 40), bird * 257, dtype=np.uint16)).save(root / "épée bird" / "deep16.png")
    pal = _solid(dog).convert("P")
    pal.info["transparency"] = 255  # an unused palette index: nothing actually transparent
    pal.save(root / "dog" / "palette.png", transparency=255)
    rgba = _solid(dog, mode="RGBA")
    rgba.save(root / "dog" / "alpha.png")
    _solid(dog).save(root / "dog" / "png_named.JPEG", format="PNG")  # ImageNet has PNGs named .JPEG
    n += 8
    # Bad inputs: recorded as skipped, never fatal.
    (root / "dog" / "empty.jpg").write_bytes(b"")
    (root / "dog" / "notes.JPEG").write_text("not an image\n")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "dog" / "readme.txt").write_text("class notes\n")
    _solid(cat, size=(1200, 1000)).save(root / "cat" / "huge.png")
    return root, n


CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_cifar10(root: Path, per_batch: int = 6) -> Path:
    """CIFAR-10 python batches in the authors' layout (bytes keys, uint8 planes), label-encoded pixels."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, per_batch).tolist()
        data = np.stack([np.full(3072, label_value(y, 10), dtype=np.uint8) for y in labels])
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"{name}_{i}.png".encode() for i in range(per_batch)]}
        with open(d / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}, f, protocol=2)
    return d


def read_samples(tar_path: Path) -> list[dict]:
    """All samples of a shard as dicts of member bytes (read in memory), in tar order."""
    samples: list[dict] = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            key, _, ext = m.name.partition(".")
            if not samples or samples[-1]["__key__"] != key:
                samples.append({"__key__": key, "__order__": []})
            samples[-1][ext] = tar.extractfile(m).read()
            samples[-1]["__order__"].append(ext)
    return samples


def dir_bytes(out: Path) -> dict[str, bytes]:
    """Every visible output file's bytes (shards, indexes, index.json)."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.startswith(".")}


def kill_build_after(cmd: list[str], out: Path, shards_done: int, *, cwd: Path | None = None,
                     timeout: float = 120, sig: int = signal.SIGKILL, stderr=subprocess.DEVNULL) -> int:
    """Run a ``pipeline shard`` command in its own process group and send ``sig`` to the whole group (the
    build and any pool workers: SIGKILL as a scheduler or the OOM killer would, SIGINT as Ctrl-C in a
    terminal does) once ``shards_done`` shards are finished. Returns how many shards were done; fails
    if the build ended before the signal, or did not end as that signal should end it."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        deadline = time.monotonic() + timeout
        while len(list(out.glob(".*.done.json"))) < shards_done:  # some shards finished, most not yet
            assert proc.poll() is None, "the build finished before it could be killed"
            assert time.monotonic() < deadline, f"fewer than {shards_done} shards done after {timeout} s"
            time.sleep(0.005)
        os.killpg(proc.pid, sig)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == (130 if sig == signal.SIGINT else -sig)  # Ctrl-C: the CLI's own exit code
    assert not (out / "index.json").exists()
    return len(list(out.glob(".*.done.json")))


def note_and_sleep(path: str, seconds: float) -> None:
    """A pool task for the Ctrl-C tests: writes "started", then "finished" after ``seconds`` or, when
    interrupted, "interrupted" (its cleanup ran)."""
    try:
        Path(path).write_text("started")  # the file exists from here: a SIGINT may come at once
        time.sleep(seconds)
    except KeyboardInterrupt:
        Path(path).write_text("interrupted")
        raise
    Path(path).write_text("finished")
