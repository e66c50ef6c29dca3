"""Sources: a collection on disk → a sorted listing of lightweight ``Record``s.

A record carries no pixels, only what the plan needs (key, label, split, size) and a
reference that ``Source.load`` turns into bytes or an array inside the shard task. The
listing order is deterministic (sorted paths, file order for array formats), so keys
(the record's position in the listing) are stable across runs and machines.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.shard.manifest import PLAN_FILE

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pnm"}
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
SPLITS = ("train", "val")
FORMATS = ("auto", "imagefolder", "mnist-idx", "cifar10", "imagenet-tar", "imagenet-kaggle")


@dataclasses.dataclass(frozen=True, slots=True)
class Record:
    """One sample of the listing. ``ref`` is a relative path (files) or an index into an array."""

    key: str  # 9-digit position in the listing: unique, no dots, independent of the shuffle
    label: int
    source: str  # what a human needs to find the input: relative path or "train[123]"
    size: int  # bytes it is expected to take in a shard (stat size, or an estimate for arrays)
    split: str | None  # "train"/"val" when the source defines it, else None
    ref: str | int


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input left out of the shards, and why."""

    split: str | None
    source: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "source": self.source, "reason": self.reason}


@dataclasses.dataclass(frozen=True)
class Listing:
    """Everything known about a source before any image is read."""

    format: str
    path: Path
    classes: tuple[str, ...]
    records: tuple[Record, ...]
    skipped: tuple[Skip, ...]  # files ignored at listing time (not images by extension)
    lossless: bool  # array sources are stored as PNG, file sources as JPEG
    has_splits: bool
    class_names: tuple[str, ...] | None = None  # human names aligned with classes (ImageNet's synsets)


def make_key(index: int) -> str:
    """Sample key: the 9-digit zero-padded position of the sample in its source listing."""
    return f"{index:09d}"


# ----------------------------------------------------------------------------- detection


def detect_format(path: Path) -> str:
    """The format of a source directory (ImageNet layouts first); ``UserError`` if none fits."""
    if not path.exists():
        raise UserError(f"source not found: {path}")
    if not path.is_dir():
        raise UserError(f"source must be a directory (image folder, MNIST idx files or CIFAR-10 batches): {path}")
    from pipeline.shard import imagenet

    found = imagenet.detect(path)
    if found:
        return found
    if _find_mnist_file(path, "train", "images", required=False):
        return "mnist-idx"
    if _cifar_dir(path) is not None:
        return "cifar10"
    if any(entry.is_dir() and not entry.name.startswith(".") for entry in os.scandir(path)):
        return "imagefolder"
    raise UserError(
        f"cannot tell the format of {path}: expected class sub-folders (imagefolder), "
        "train-images-idx3-ubyte[.gz] (mnist-idx), data_batch_1..5 + test_batch (cifar10), "
        "ILSVRC2012_img_train.tar (imagenet-tar) or ILSVRC/Data/CLS-LOC (imagenet-kaggle); use --format"
    )


def read_classes_file(path: Path) -> tuple[str, ...]:
    """Class names, one per line in label order (blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read --classes file {path}: {getattr(exc, 'strerror', None) or exc} "
                        "(expected UTF-8 text, one class name per line)") from None
    names = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not names:
        raise UserError(f"--classes file {path} lists no class names")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserError(f"--classes file {path} lists {dup[0]!r} more than once")
    return names


def list_source(path: Path, fmt: str = "auto", classes_file: Path | None = None, *, val_labels: Path | None = None,
                class_names_file: Path | None = None, exclude: Path | None = None) -> Listing:
    """List a source: detect its format if ``fmt`` is auto, read its classes, enumerate its samples.

    ``val_labels`` labels a flat val folder (ImageNet's); ``class_names_file`` maps class folder
    names (wnids) to human names. ``exclude`` (the OUT_DIR, when it lies inside an image folder)
    is left out of the listing, so a rerun lists the same inputs as the first run did.
    """
    from pipeline.shard import imagenet

    path = Path(path)
    if not path.exists():
        raise UserError(f"source not found: {path}")
    if not path.is_dir():
        raise UserError(f"source must be a directory: {path}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    classes = read_classes_file(classes_file) if classes_file is not None else None
    if val_labels is not None and fmt not in (*imagenet.FORMATS, "imagefolder"):
        raise UserError(f"--val-labels labels a flat val folder; the {fmt} source has none")
    if fmt in imagenet.FORMATS:
        listing = imagenet.list_imagenet(path, fmt, val_labels=val_labels, class_names_file=class_names_file,
                                         exclude=exclude)
    elif fmt == "imagefolder" and val_labels is not None:
        if not (path / "train").is_dir() or not (path / "val").is_dir():
            raise UserError(f"--val-labels needs {path}/train/<class>/ and a flat {path}/val/ folder")
        listing = imagenet.list_split_tree(path, path / "train", path / "val", fmt=fmt, val_labels=val_labels,
                                           class_names_file=class_names_file, exclude=exclude)
    elif fmt == "imagefolder":
        listing = _list_imagefolder(path, classes, exclude)
    elif fmt == "mnist-idx":
        listing = _list_arrays(path, fmt, MnistArrays(path), classes or _mnist_class_names(path))
    elif fmt == "cifar10":
        arrays = CifarArrays(path)
        listing = _list_arrays(path, fmt, arrays, classes or arrays.class_names())
    else:
        raise UserError(f"unknown format {fmt!r}; allowed values: {', '.join(FORMATS)}")
    if class_names_file is not None and listing.class_names is None:
        listing = dataclasses.replace(listing, class_names=imagenet.read_class_names(class_names_file,
                                                                                     listing.classes))
    if not listing.records:
        raise UserError(f"no images found in {path} (format {fmt})")
    return listing


# ----------------------------------------------------------------------------- imagefolder


def _list_imagefolder(root: Path, classes: tuple[str, ...] | None, exclude: Path | None = None) -> Listing:
    # The real path of a directory never to list (OUT_DIR inside SOURCE): compared resolved, so
    # a relative, absolute or symlinked spelling of it is recognised alike.
    skip_dir = os.path.realpath(exclude) if exclude is not None else None

    if skip_dir is not None and skip_dir == os.path.realpath(root):
        raise UserError(f"OUT_DIR is SOURCE ({root}): give the shards a folder of their own (one inside SOURCE is "
                        "left out of the listing)")
    earlier_outputs: set[str] = set()  # folders of an earlier `pipeline shard` inside SOURCE: never classes

    def subdirs(path: Path) -> list[str]:
        names = []
        for n in _subdirs(path):
            if os.path.realpath(path / n) == skip_dir:
                continue
            if _is_shard_set(path / n):
                earlier_outputs.add((path / n).relative_to(root).as_posix())
                continue
            names.append(n)
        return names

    # ImageNet's layout with the val split already arranged by class: root/{train,val}/<class>/...
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir() and os.path.realpath(root / s) != skip_dir}
    if set(split_dirs) == set(SPLITS) and subdirs(split_dirs["train"]) and not subdirs(split_dirs["val"]) \
            and _has_visible_files(split_dirs["val"]):
        # Without this, train/ and val/ themselves became the two classes, every image in train.
        raise UserError(f"{split_dirs['val']} is a flat val folder (images without class folders): give its "
                        "labels with --val-labels FILE ('file label' lines), or arrange it as val/<class>/")
    has_splits = set(split_dirs) == set(SPLITS) and all(subdirs(d) for d in split_dirs.values())
    parts = [(s, d) for s, d in split_dirs.items()] if has_splits else [(None, root)]
    folders = sorted({name for _, d in parts for name in subdirs(d)})
    if not folders:
        raise UserError(f"no class folders in {root}: imagefolder expects one sub-folder per class")
    if classes is None:
        classes = tuple(folders)
    else:
        unknown = [f for f in folders if f not in classes]
        if unknown:
            raise UserError(f"class folder {unknown[0]!r} in {root} is not listed in the --classes file")
    label_of = {name: i for i, name in enumerate(classes)}
    records: list[Record] = []
    skipped: list[Skip] = []
    # Directories already listed, by (st_dev, st_ino) of the real directory. Seeded with the root,
    # the split folders and every class folder, so that a link back up (bird/loop -> ..) or to
    # another class's folder is never walked as part of this class.
    seen: dict[tuple[int, int], str] = {}
    for split, base in parts:
        for d in [root, base, *(base / n for n in subdirs(base))]:
            seen.setdefault(_dir_id(d), str(d))
    for split, base in parts:
        for name in sorted(subdirs(base)):
            files, repeats = _walk_files(base / name, seen, skip_dir)
            for rel, first in repeats:
                shown = (base / name / rel).relative_to(root).as_posix()
                first = Path(os.path.relpath(first, root)).as_posix()
                first = "the source folder" if first == "." else first
                skipped.append(Skip(split, shown, f"folder already listed: the same directory as {first} "
                                                  "(a symlink loop or a second link to it)"))
            for rel in files:
                full = base / name / rel
                shown = full.relative_to(root).as_posix()
                if full.suffix.lower() not in IMAGE_EXTENSIONS:
                    skipped.append(Skip(split, shown, f"not an image file extension: {full.suffix or '(none)'}"))
                    continue
                try:
                    size = full.stat().st_size
                except OSError as exc:
                    skipped.append(Skip(split, shown, f"unreadable: {exc.strerror}"))
                    continue
                records.append(Record(make_key(len(records)), label_of[name], shown, size, split, shown))
    skipped += [Skip(None, d, "a shard set of an earlier `pipeline shard` (its OUT_DIR), not a class folder")
                for d in sorted(earlier_outputs)]
    return Listing("imagefolder", root, tuple(classes), tuple(records), tuple(skipped), False, has_splits)


def _is_shard_set(path: Path) -> bool:
    """A folder a `pipeline shard` build wrote (its plan file is there from the build's start to the end)."""
    return (path / PLAN_FILE).is_file()


def _subdirs(path: Path) -> list[str]:
    return [e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith(".")]


def _has_visible_files(path: Path) -> bool:
    with os.scandir(path) as it:
        return any(not e.name.startswith(".") and e.is_file() for e in it)


def _dir_id(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)  # follows symlinks: the identity of the real directory
    return st.st_dev, st.st_ino


def _walk_files(top: Path, seen: dict[tuple[int, int], str] | None = None,
                skip_dir: str | None = None) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative paths of all non-hidden files under ``top`` (nested folders included), sorted.

    Symlinks to directories are followed (data is often linked in), but a directory already in
    ``seen`` (by device and inode, updated here) is not entered again: those come back as
    ``(relative path, path it was first listed under)`` in the second list, so a symlink loop ends.
    ``skip_dir`` (a real path) is never entered.
    """
    seen = {} if seen is None else seen
    seen.setdefault(_dir_id(top), str(top))
    out: list[str] = []
    repeats: list[tuple[str, str]] = []
    for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
        rel = os.path.relpath(dirpath, top)
        keep = []
        # Sorted, so which of two links to one directory counts as first is the same on every run.
        for d in sorted(d for d in dirnames if not d.startswith(".")):
            full = os.path.join(dirpath, d)
            if skip_dir is not None and os.path.realpath(full) == skip_dir:
                continue
            try:
                ident = _dir_id(full)
            except OSError:
                keep.append(d)  # os.walk reports nothing either; as before
                continue
            sub = d if rel == "." else os.path.join(rel, d)
            if ident in seen:
                repeats.append((sub, seen[ident]))
                continue
            seen[ident] = full
            keep.append(d)
        dirnames[:] = keep
        for f in filenames:
            if not f.startswith("."):
                out.append(f if rel == "." else os.path.join(rel, f))
    return sorted(out), sorted(repeats)


# ----------------------------------------------------------------------------- array sources


def _list_arrays(path: Path, fmt: str, arrays: "MnistArrays | CifarArrays", classes: tuple[str, ...]) -> Listing:
    counts = arrays.counts()
    labels = arrays.labels()
    records = []
    per_sample = arrays.estimated_bytes()
    for split, part in (("train", "train"), ("val", "test")):
        for i, label in enumerate(labels[part]):
            if not 0 <= label < len(classes):
                raise UserError(f"{path}: label {label} of {part}[{i}] is outside the {len(classes)} class names")
            records.append(Record(make_key(len(records)), int(label), f"{part}[{i}]", per_sample, split, i))
    assert len(records) == counts["train"] + counts["test"]
    return Listing(fmt, path, tuple(classes), tuple(records), (), True, True)


def _find_mnist_file(root: Path, part: str, kind: str, required: bool = True) -> Path | None:
    # Both the original names (train-images-idx3-ubyte) and the dotted variant (train-images.idx3-ubyte).
    dims = "3" if kind == "images" else "1"
    pattern = re.compile(rf"{'t10k' if part == 'test' else 'train'}-{kind}[-.]idx{dims}-ubyte(\.gz)?")
    for entry in sorted(os.listdir(root)):
        if pattern.fullmatch(entry):
            return root / entry
    if required:
        raise UserError(f"{root}: missing {'t10k' if part == 'test' else 'train'}-{kind}-idx{dims}-ubyte[.gz]")
    return None


def _mnist_class_names(path: Path) -> tuple[str, ...]:
    names = " ".join([str(path).lower(), *(n.lower() for n in os.listdir(path))])
    return FASHION_MNIST_CLASSES if "fashion" in names else tuple(str(d) for d in range(10))


def _read_idx(path: Path, expected_dims: int) -> np.ndarray:
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] != expected_dims:
        raise UserError(f"{path}: not an unsigned-byte idx file with {expected_dims} dimension(s)")
    header = 4 + 4 * expected_dims
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(expected_dims))
    if len(data) != header + int(np.prod(shape)):
        raise UserError(f"{path}: size does not match its header {shape} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


class MnistArrays:
    """MNIST / Fashion-MNIST idx files: train-* → train, t10k-* → val."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = {(p, k): _find_mnist_file(root, p, k) for p in ("train", "test") for k in ("images", "labels")}

    @functools.cached_property
    def _labels(self) -> dict[str, np.ndarray]:
        return {p: _read_idx(self.files[(p, "labels")], 1) for p in ("train", "test")}

    @functools.cached_property
    def _images(self) -> dict[str, np.ndarray]:
        out = {p: _read_idx(self.files[(p, "images")], 3) for p in ("train", "test")}
        for p in out:
            if len(out[p]) != len(self._labels[p]):
                raise UserError(f"{self.root}: {len(out[p])} {p} images but {len(self._labels[p])} labels")
        return out

    def counts(self) -> dict[str, int]:
        return {p: len(v) for p, v in self._images.items()}

    def labels(self) -> dict[str, list[int]]:
        return {p: v.tolist() for p, v in self._labels.items()}

    def estimated_bytes(self) -> int:
        h, w = self._images["train"].shape[1:3]
        return h * w  # PNG of a 28x28 grey-as-RGB image compresses to about one byte per pixel

    def image(self, part: str, index: int) -> np.ndarray:
        return self._images[part][index]


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a pickle cannot run code through it."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        # Protocol-2 pickles written by Python 3 spell byte strings as _codecs.encode(str, "latin1").
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: CIFAR batches hold only arrays and lists")


def _unpickle(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official batches are Python 2 pickles with byte-string keys.
            obj = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read CIFAR batch {path}: {exc}") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a dict in a CIFAR batch, got {type(obj).__name__}")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in obj.items()}


_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _cifar_dir(path: Path) -> Path | None:
    for d in (path, path / "cifar-10-batches-py"):
        if all((d / n).is_file() for n in (*_CIFAR_TRAIN, "test_batch")):
            return d
    return None


class CifarArrays:
    """CIFAR-10 python batches: data_batch_1..5 → train, test_batch → val."""

    def __init__(self, root: Path) -> None:
        d = _cifar_dir(root)
        if d is None:
            raise UserError(f"{root}: missing CIFAR-10 batches (data_batch_1..5 and test_batch)")
        self.dir = d

    @functools.cached_property
    def _parts(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        out = {}
        for part, names in (("train", _CIFAR_TRAIN), ("test", ("test_batch",))):
            data, labels = [], []
            for n in names:
                batch = _unpickle(self.dir / n)
                try:
                    x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                    y = np.asarray(batch["labels"], dtype=np.int64)
                except (KeyError, ValueError) as exc:
                    raise UserError(f"{self.dir / n}: not a CIFAR-10 batch ({exc})") from None
                if len(x) != len(y):
                    raise UserError(f"{self.dir / n}: {len(x)} images but {len(y)} labels")
                data.append(x)
                labels.append(y)
            # CIFAR stores planes (3, 32, 32); images are HWC.
            out[part] = (np.concatenate(data).transpose(0, 2, 3, 1), np.concatenate(labels))
        return out

    def class_names(self) -> tuple[str, ...]:
        meta = self.dir / "batches.meta"
        if not meta.is_file():
            return tuple(str(i) for i in range(10))
        names = _unpickle(meta).get("label_names", [])
        return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names) or tuple(map(str, range(10)))

    def counts(self) -> dict[str, int]:
        return {p: len(v[1]) for p, v in self._parts.items()}

    def labels(self) -> dict[str, list[int]]:
        return {p: v[1].tolist() for p, v in self._parts.items()}

    def estimated_bytes(self) -> int:
        return 32 * 32 * 3  # PNG barely compresses natural 32x32 images

    def image(self, part: str, index: int) -> np.ndarray:
        return self._parts[part][0][index]


# ----------------------------------------------------------------------------- loading in tasks


@functools.lru_cache(maxsize=4)
def _arrays(fmt: str, path: str) -> MnistArrays | CifarArrays:
    # One decoded copy per process, shared by all shard tasks that process runs.
    return MnistArrays(Path(path)) if fmt == "mnist-idx" else CifarArrays(Path(path))


def load(fmt: str, root: Path, record: Record) -> bytes | np.ndarray:
    """The raw input of ``record``: file bytes (imagefolder) or an HxW[x3] uint8 array.

    Raises ``OSError`` when a file cannot be read; the shard task records that as a skip.
    """
    if fmt == "imagefolder":
        with open(Path(root) / str(record.ref), "rb") as f:
            return f.read()
    if fmt in ("imagenet-tar", "imagenet-kaggle"):
        from pipeline.shard import imagenet

        return imagenet.load(fmt, root, record)
    part = "train" if record.split == "train" else "test"
    return _arrays(fmt, str(root)).image(part, int(record.ref))
