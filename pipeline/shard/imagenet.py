"""ImageNet as distributed → records: the ILSVRC2012 archives, the Kaggle layout, flat val folders.

``imagenet-tar``: SOURCE holds ``ILSVRC2012_img_train.tar`` (a tar of one tar per class,
``n01440764.tar`` …) and optionally ``ILSVRC2012_img_val.tar`` (one flat folder of JPEGs).
Nothing is extracted: a listing pass reads the member headers (the outer tar's, then each
inner tar's through a seekable view of the outer one) and keeps each image's absolute
byte offset and size; a shard task then reads its members with ``os.pread``. The listing
depends on the archives' bytes alone, so the plan, and every resumed run, is the same.

``imagenet-kaggle``: SOURCE holds ``ILSVRC/Data/CLS-LOC/{train/<wnid>/*.JPEG, val/*.JPEG}``,
``LOC_val_solution.csv`` and ``LOC_synset_mapping.txt``.

Labels: the class index is the position of the wnid in sorted order (the standard
index). Val files are labelled from a file mapping a file name (with or without its
extension) to a wnid or a class index: ``LOC_val_solution.csv`` beside the source, or
``--val-labels FILE`` (CSV or whitespace-separated text; a header line is ignored).
A val file without a label is skipped with the reason; a label for a file that is not
there is recorded as a skip too; an unknown wnid or an index out of range is an error.

Record order (hence the keys) matches an image folder of the same images with val
arranged by class: train by (wnid, file name), then val by (label, file name).
"""

from __future__ import annotations

import functools
import os
import re
import tarfile
from pathlib import Path

from pipeline.errors import UserError
from pipeline.shard.sources import IMAGE_EXTENSIONS, Listing, Record, Skip, make_key

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
KAGGLE_DIR = Path("ILSVRC", "Data", "CLS-LOC")
KAGGLE_VAL_LABELS = "LOC_val_solution.csv"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
FORMATS = ("imagenet-tar", "imagenet-kaggle")
_WNID = re.compile(r"n\d{8}")


def detect(path: Path) -> str | None:
    """``imagenet-tar`` or ``imagenet-kaggle`` when ``path`` has that layout, else None."""
    if (path / TRAIN_TAR).is_file():
        return "imagenet-tar"
    if (path / KAGGLE_DIR / "train").is_dir():
        return "imagenet-kaggle"
    return None


def list_imagenet(path: Path, fmt: str, *, val_labels: Path | None, class_names_file: Path | None,
                  exclude: Path | None = None) -> Listing:
    """The listing of an ``imagenet-tar`` or ``imagenet-kaggle`` source (``exclude``: see ``list_split_tree``)."""
    if fmt == "imagenet-tar":
        return _list_tar(path, val_labels, class_names_file)
    base = path / KAGGLE_DIR
    if not (base / "train").is_dir():
        raise UserError(f"{path}: no {KAGGLE_DIR / 'train'} folder (the Kaggle ImageNet layout)")
    if val_labels is None and (path / KAGGLE_VAL_LABELS).is_file():
        val_labels = path / KAGGLE_VAL_LABELS
    names_file = class_names_file or _beside(path, SYNSET_MAPPING)
    return list_split_tree(path, base / "train", base / "val", fmt=fmt, val_labels=val_labels,
                           class_names_file=names_file, exclude=exclude)


def list_split_tree(root: Path, train_dir: Path, val_dir: Path, *, fmt: str, val_labels: Path | None,
                    class_names_file: Path | None, exclude: Path | None = None) -> Listing:
    """``train_dir/<class>/*`` plus a flat ``val_dir`` labelled from ``val_labels`` (refs relative to root).

    ``exclude`` (the OUT_DIR) is never taken for a class folder; the val folder is read flat, so a
    folder inside it is never listed anyway.
    """
    skip_dir = os.path.realpath(exclude) if exclude is not None else None
    classes = tuple(sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith(".")
                           and os.path.realpath(e.path) != skip_dir))
    if not classes:
        raise UserError(f"no class folders in {train_dir}")
    records: list[Record] = []
    skipped: list[Skip] = []
    for label, wnid in enumerate(classes):
        for name, size in _files(train_dir / wnid):
            _add(records, skipped, "train", (train_dir / wnid / name).relative_to(root).as_posix(), label, size)
    has_val = val_dir.is_dir()
    if has_val:
        if val_labels is None:
            raise UserError(f"{val_dir} is a flat val folder: give its labels with --val-labels FILE "
                            f"(e.g. {KAGGLE_VAL_LABELS})")
        labels = read_val_labels(val_labels, classes)
        found = [(name, (val_dir / name).relative_to(root).as_posix(), size) for name, size in _files(val_dir)]
        _add_val(records, skipped, found, labels, val_labels, (val_dir.relative_to(root) / "{}").as_posix())
    return Listing(fmt, root, classes, tuple(records), tuple(skipped), False, has_val,
                   class_names=read_class_names(class_names_file, classes))


def _beside(path: Path, name: str) -> Path | None:
    return path / name if (path / name).is_file() else None


def _files(folder: Path) -> list[tuple[str, int]]:
    """(name, size) of the visible files directly in ``folder``, sorted by name; one scandir, no extra stat."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            if not e.name.startswith(".") and e.is_file():
                out.append((e.name, e.stat().st_size))
    return sorted(out)


def _add(records: list[Record], skipped: list[Skip], split: str, source: str, label: int, size: int,
         ref: str | int | None = None) -> None:
    if os.path.splitext(source)[1].lower() not in IMAGE_EXTENSIONS:
        skipped.append(Skip(split, source, f"not an image file extension: {os.path.splitext(source)[1] or '(none)'}"))
        return
    records.append(Record(make_key(len(records)), label, source, size, split, source if ref is None else ref))


def _add_val(records: list[Record], skipped: list[Skip], found: list[tuple[str, str, int | str]],
             labels: dict[str, int], labels_file: Path, shown: str, refs: dict[str, int] | None = None) -> None:
    """Val records in (label, name) order; unlabelled files and labels without a file become skips."""
    present: set[str] = set()
    labelled = []
    for name, source, size in found:
        stem = _stem(name)
        present.add(stem)
        if stem not in labels:
            skipped.append(Skip("val", source, f"unlabelled: no line for {stem} in {labels_file.name}"))
        else:
            labelled.append((labels[stem], name, source, size))
    for label, name, source, size in sorted(labelled):
        _add(records, skipped, "val", source, label, size, None if refs is None else refs[name])
    for stem in sorted(set(labels) - present):
        skipped.append(Skip("val", shown.format(stem), f"missing: labelled in {labels_file.name} but not in the val set"))


def _stem(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    stem, ext = os.path.splitext(base)
    return stem if ext else base


def read_val_labels(path: Path, classes: tuple[str, ...]) -> dict[str, int]:
    """File stem → class index from a CSV (``ImageId,PredictionString``) or whitespace text file.

    The label is the first token of the second field: a wnid, or a class index in sorted-wnid
    order. A first line whose label is neither is a header. Anything else wrong is a ``UserError``.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read val labels {path}: {getattr(exc, 'strerror', None) or exc}") from None
    index = {wnid: i for i, wnid in enumerate(classes)}
    out: dict[str, int] = {}
    for no, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in line.split(",")] if "," in line else line.split()
        tokens = fields[1].split() if len(fields) > 1 else []
        if not tokens:
            raise UserError(f"{path} line {no}: expected 'file label', got {line[:80]!r}")
        name, token = _stem(fields[0]), tokens[0]
        if token in index:
            label = index[token]
        elif token.isdigit():
            label = int(token)
            if label >= len(classes):
                raise UserError(f"{path} line {no}: class index {label} outside 0..{len(classes) - 1} "
                                "(indices count sorted wnids from 0)")
        elif not out and not _WNID.fullmatch(token):
            continue  # a header line, before any label
        elif _WNID.fullmatch(token):
            raise UserError(f"{path} line {no}: unknown wnid {token!r} for {fields[0]} "
                            f"(not one of the {len(classes)} train classes)")
        else:
            raise UserError(f"{path} line {no}: label {token!r} of {fields[0]} is neither a wnid nor a class index")
        if out.setdefault(name, label) != label:
            raise UserError(f"{path} line {no}: {fields[0]} is labelled twice, differently")
    if not out:
        raise UserError(f"{path} holds no val labels")
    return out


def read_class_names(path: Path | None, classes: tuple[str, ...]) -> tuple[str, ...] | None:
    """Human names aligned with ``classes`` from ``wnid name…`` lines (``LOC_synset_mapping.txt``)."""
    if path is None:
        return None
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read class names {path}: {getattr(exc, 'strerror', None) or exc}") from None
    names: dict[str, str] = {}
    for line in lines:
        wnid, _, name = line.strip().partition(" ")
        if wnid and not wnid.startswith("#"):
            names[wnid] = name.strip() or wnid
    missing = [c for c in classes if c not in names]
    if len(missing) == len(classes):
        raise UserError(f"class names file {path} names none of the classes ({classes[0]}, …): "
                        "expected lines like 'n01440764 tench, Tinca tinca'")
    return tuple(names.get(c, c) for c in classes)


# ----------------------------------------------------------------------------- the archives


def _list_tar(path: Path, val_labels: Path | None, class_names_file: Path | None) -> Listing:
    train_tar, val_tar = path / TRAIN_TAR, path / VAL_TAR
    if not train_tar.is_file():
        raise UserError(f"{path}: no {TRAIN_TAR}")
    records: list[Record] = []
    skipped: list[Skip] = []
    inner = _members(train_tar)
    tars = sorted((n, off, size) for n, off, size in inner if n.endswith(".tar"))
    for name, _, _ in inner:
        if not name.endswith(".tar"):
            skipped.append(Skip("train", f"{TRAIN_TAR}/{name}", "not a class tar: expected <wnid>.tar"))
    classes = tuple(n[:-4].rsplit("/", 1)[-1] for n, _, _ in tars)
    if not classes:
        raise UserError(f"{train_tar} holds no per-class tars (<wnid>.tar)")
    with open(train_tar, "rb") as f:
        for label, (name, offset, size) in enumerate(tars):
            for member, moff, msize in sorted(_members_at(f, offset, size, f"{train_tar}/{name}")):
                _add(records, skipped, "train", f"train/{classes[label]}/{member}", label, msize, offset + moff)
    has_val = val_tar.is_file()
    if has_val:
        if val_labels is None and (path / KAGGLE_VAL_LABELS).is_file():
            val_labels = path / KAGGLE_VAL_LABELS
        if val_labels is None:
            raise UserError(f"{val_tar} needs its labels: --val-labels FILE (file name → wnid or class index, "
                            f"e.g. {KAGGLE_VAL_LABELS})")
        labels = read_val_labels(val_labels, classes)
        members = _members(val_tar)
        found = [(n, f"val/{n}", size) for n, _, size in members]
        _add_val(records, skipped, found, labels, val_labels, "val/{}", {n: off for n, off, _ in members})
    names_file = class_names_file or _beside(path, SYNSET_MAPPING)
    return Listing("imagenet-tar", path, classes, tuple(records), tuple(skipped), False, has_val,
                   class_names=read_class_names(names_file, classes))


def _members(tar_path: Path) -> list[tuple[str, int, int]]:
    with open(tar_path, "rb") as f:
        return _members_at(f, 0, os.fstat(f.fileno()).st_size, str(tar_path))


def _members_at(f, offset: int, size: int, shown: str) -> list[tuple[str, int, int]]:
    """(name, data offset relative to ``offset``, size) of the regular files of the tar at ``offset``.

    Headers only: tarfile seeks over the data, so listing costs one small read per member.
    """
    f.seek(offset)
    try:
        with tarfile.open(fileobj=_Window(f, offset, size), mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except (tarfile.TarError, EOFError) as exc:
        raise UserError(f"{shown} is not a readable tar: {exc}") from None


class _Window:
    """A read-only, seekable view of ``size`` bytes at ``start`` of an open file (an inner tar)."""

    def __init__(self, f, start: int, size: int) -> None:
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def read(self, n: int = -1) -> bytes:
        n = self._size - self._pos if n is None or n < 0 else min(n, self._size - self._pos)
        self._f.seek(self._start + self._pos)
        data = self._f.read(n)
        self._pos += len(data)
        return data

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = pos if whence == 0 else (self._pos + pos if whence == 1 else self._size + pos)
        return self._pos

    def tell(self) -> int:
        return self._pos


@functools.lru_cache(maxsize=4)
def _fd(path: str) -> int:
    # One descriptor per archive per process, for the process's life; pread needs no shared position.
    return os.open(path, os.O_RDONLY)


def load(fmt: str, root: Path, record: Record) -> bytes:
    """The stored bytes of ``record``: a file (kaggle) or an archive member read by offset (tar)."""
    if fmt != "imagenet-tar":
        with open(Path(root) / str(record.ref), "rb") as f:
            return f.read()
    archive = Path(root) / (TRAIN_TAR if record.split == "train" else VAL_TAR)
    data = os.pread(_fd(str(archive)), record.size, int(record.ref))
    if len(data) != record.size:
        raise OSError(f"{archive.name} ended {record.size - len(data)} bytes early at {record.source}")
    return data
