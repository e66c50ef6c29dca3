"""An ImageNet-shaped collection for tests and benchmarks, in any of ImageNet's three layouts.

    python -m benchmarks.imagenet_gen OUT --layout tar --classes 1000 --per-class 50 --val-per-class 2

What is real and what is derived:

* Pixels: a pool of ``pool`` distinct JPEGs rendered once from the real photographs that
  ``benchmarks.images`` uses (scikit-learn's and matplotlib's samples): random crops,
  flips and rescales with added Gaussian noise (sigma 6-22, the derived part that brings
  the file sizes to ImageNet's), encoded at quality 90. With only three source photos, the pool is
  what gives variety; every output file is one pool image, chosen by a seeded draw.
* Bytes: each file gets a unique JPEG comment segment (its own name) right after the
  start-of-image marker, so no two files are byte-identical and checksums differ, yet
  every file decodes to its pool image's pixels. This is what makes 50,000 files on two
  cores a matter of disk speed, not of JPEG encoding.
* Sizes: ImageNet's shape mix, approximated: most images 500x375 or 375x500, some
  500x333 / 333x500 / 500x500, a tail of small (long side 80-300) and large (600-1,600)
  ones; at quality 90 the mean file is ~110 KB like ImageNet's (the measured mean is in
  ``.complete.json``). Not ImageNet's exact histogram.
* Oddities, at ImageNet's rates and at least one each: CMYK JPEGs (22 in 1,281,167 train
  images), a PNG under a ``.JPEG`` name (1 in the train set), greyscale JPEGs (roughly
  1 in 300; an estimate). Their positions are seeded draws.
* Names: synthetic but ImageNet-formed wnids (``n`` + 8 digits, sorted = class index),
  ``<wnid>_<n>.JPEG`` train files, ``ILSVRC2012_val_<8 digits>.JPEG`` val files numbered
  in a shuffled class order, and a ``LOC_synset_mapping.txt`` of made-up names.

Layouts: ``folder`` (``train/<wnid>/``, ``val/<wnid>/``: ImageNet extracted and val
arranged by class), ``tar`` (``ILSVRC2012_img_train.tar`` of ``<wnid>.tar`` + the flat
``ILSVRC2012_img_val.tar`` + ``LOC_val_solution.csv`` + ``LOC_synset_mapping.txt``) and
``kaggle`` (``ILSVRC/Data/CLS-LOC/{train/<wnid>,val}`` + the two files). The same seed gives
the same images, names and labels in every layout. Deterministic per seed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.images import photo_paths

LAYOUTS = ("folder", "tar", "kaggle")
TRAIN_IMAGES = 1_281_167
# (width, height, probability): ImageNet's common shapes; "small"/"large" draw a long side.
SHAPES = ((500, 375, 0.55), (375, 500, 0.17), (500, 333, 0.08), (333, 500, 0.04), (500, 500, 0.06),
          ("small", None, 0.05), ("large", None, 0.05))
VERSION = 1


def wnids(num_classes: int, seed: int) -> list[str]:
    """Sorted, distinct, ImageNet-formed class ids."""
    rng = np.random.default_rng([seed, 7])
    ids = rng.choice(np.arange(1_000_000, 15_000_000), size=num_classes, replace=False)
    return [f"n{int(i):08d}" for i in sorted(ids)]


def _shape(rng: np.random.Generator, aspect: float) -> tuple[int, int]:
    p = np.array([s[2] for s in SHAPES])
    w, h, _ = SHAPES[int(rng.choice(len(SHAPES), p=p / p.sum()))]
    if w == "small" or w == "large":
        long_side = int(rng.integers(80, 301) if w == "small" else rng.integers(600, 1601))
        short = max(1, round(long_side / aspect))
        return (long_side, short) if rng.random() < 0.7 else (short, long_side)
    return int(w), int(h)


def render_pool(pool: int, seed: int, quality: int = 90) -> list[bytes]:
    """``pool`` distinct JPEGs cropped, flipped and rescaled from the real photographs."""
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    rng = np.random.default_rng([seed, 1])
    out = []
    for _ in range(pool):
        photo = photos[int(rng.integers(len(photos)))]
        w, h = _shape(rng, float(rng.uniform(1.25, 1.6)))
        pw, ph = photo.size
        scale = max(w / pw, h / ph) * float(rng.uniform(1.0, 1.8))  # zoom into the photo, then crop to shape
        img = photo.resize((max(w, round(pw * scale)), max(h, round(ph * scale))), Image.Resampling.BILINEAR)
        x, y = int(rng.integers(0, img.width - w + 1)), int(rng.integers(0, img.height - h + 1))
        img = img.crop((x, y, x + w, y + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        # Sensor-like noise: the sample photos are smoother than ImageNet's, whose JPEGs at q90
        # average ~110 KB; without it the same shapes average ~50 KB.
        noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, float(rng.uniform(6, 22)), (h, w, 3))
        img = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


def _odd(kind: str, base: bytes) -> bytes:
    with Image.open(io.BytesIO(base)) as img:
        img = img.convert("RGB")
        buf = io.BytesIO()
        if kind == "png":
            img.save(buf, "PNG")
        else:
            img.convert("CMYK" if kind == "cmyk" else "L").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tag(jpeg: bytes, name: str) -> bytes:
    """The same JPEG with a comment segment naming the file: unique bytes, identical pixels."""
    if not jpeg.startswith(b"\xff\xd8"):
        return jpeg  # the PNG: ImageNet's is a one-off; it stays byte-identical to its pool entry
    text = name.encode()
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


class Plan:
    """Which file gets which pool image and oddity, and the val file names: a function of the arguments."""

    def __init__(self, num_classes: int, per_class: int, val_per_class: int, seed: int, pool: int) -> None:
        self.classes = wnids(num_classes, seed)
        rng = np.random.default_rng([seed, 2])
        n_train, n_val = num_classes * per_class, num_classes * val_per_class
        self.train_pick = rng.integers(0, pool, n_train)
        self.val_pick = rng.integers(0, pool, n_val)
        # ImageNet's val files are numbered in an order unrelated to their classes.
        self.val_numbers = rng.permutation(n_val) + 1
        self.odd: dict[tuple[str, int], str] = {}
        counts = {"cmyk": max(1, round(22 * n_train / TRAIN_IMAGES)), "png": max(1, round(n_train / TRAIN_IMAGES)),
                  "grey": max(1, round(n_train / 300))}
        free = list(rng.permutation(n_train))
        for kind, n in counts.items():
            for _ in range(min(n, len(free))):
                self.odd[("train", int(free.pop()))] = kind
        if n_val:
            self.odd[("val", int(rng.integers(n_val)))] = "cmyk"
            self.odd[("val", int(rng.integers(n_val)))] = "grey"
        self.per_class, self.val_per_class = per_class, val_per_class

    def train(self):
        """(wnid, file name, position) of every train image."""
        for c, wnid in enumerate(self.classes):
            for j in range(self.per_class):
                yield wnid, f"{wnid}_{j + 1}.JPEG", c * self.per_class + j

    def val(self):
        """(wnid, file name, position) of every val image."""
        for c, wnid in enumerate(self.classes):
            for j in range(self.val_per_class):
                i = c * self.val_per_class + j
                yield wnid, f"ILSVRC2012_val_{int(self.val_numbers[i]):08d}.JPEG", i


def generate(out: Path, *, layout: str = "folder", num_classes: int = 1000, per_class: int = 50,
             val_per_class: int = 0, seed: int = 0, pool: int = 96) -> dict:
    """Write the collection under ``out`` (reused when complete with the same arguments); returns its stats."""
    if layout not in LAYOUTS:
        raise ValueError(f"invalid layout {layout!r}; allowed values: {', '.join(LAYOUTS)}")
    out = Path(out)
    params = {"layout": layout, "num_classes": num_classes, "per_class": per_class, "val_per_class": val_per_class,
              "seed": seed, "pool": pool, "version": VERSION}
    marker = out / ".complete.json"
    if marker.exists():
        stats = json.loads(marker.read_text())
        if stats.get("params") == params:
            return stats
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan(num_classes, per_class, val_per_class, seed, pool)
    images = render_pool(pool, seed)
    odd_cache: dict[tuple[str, int], bytes] = {}

    def data(split: str, name: str, pos: int) -> bytes:
        pick = int((plan.train_pick if split == "train" else plan.val_pick)[pos])
        kind = plan.odd.get((split, pos))
        if kind is None:
            return _tag(images[pick], name)
        if (kind, pick) not in odd_cache:
            odd_cache[(kind, pick)] = _odd(kind, images[pick])
        return _tag(odd_cache[(kind, pick)], name)

    total = {"files": 0, "bytes": 0}
    writer = {"folder": _write_folder, "tar": _write_tar, "kaggle": _write_kaggle}[layout]
    for size in writer(out, plan, data):
        total["files"] += 1
        total["bytes"] += size
    if layout != "folder":
        _write_labels(out, plan)
    stats = {"params": params, "files": total["files"], "mean_bytes": total["bytes"] / max(total["files"], 1),
             "classes": plan.classes, "oddities": {f"{s}:{i}": k for (s, i), k in sorted(plan.odd.items())}}
    marker.write_text(json.dumps(stats))
    return stats


def _write_labels(out: Path, plan: Plan) -> None:
    rows = sorted((name.rsplit(".", 1)[0], wnid) for wnid, name, _ in plan.val())
    # Kaggle's PredictionString: the wnid then a box (x_min y_min x_max y_max), possibly several.
    (out / "LOC_val_solution.csv").write_text(
        "ImageId,PredictionString\n" + "".join(f"{stem},{wnid} 10 20 300 250 \n" for stem, wnid in rows))
    (out / "LOC_synset_mapping.txt").write_text(
        "".join(f"{wnid} synthetic class {i}, test synset\n" for i, wnid in enumerate(plan.classes)))


def _put(path: Path, data: bytes) -> int:
    path.write_bytes(data)
    return len(data)


def _write_folder(out: Path, plan: Plan, data):
    for split, items in (("train", plan.train()), ("val", plan.val())):
        for wnid, name, pos in items:
            (out / split / wnid).mkdir(parents=True, exist_ok=True)
            yield _put(out / split / wnid / name, data(split, name, pos))


def _write_kaggle(out: Path, plan: Plan, data):
    base = out / "ILSVRC" / "Data" / "CLS-LOC"
    for wnid, name, pos in plan.train():
        (base / "train" / wnid).mkdir(parents=True, exist_ok=True)
        yield _put(base / "train" / wnid / name, data("train", name, pos))
    (base / "val").mkdir(parents=True, exist_ok=True)
    for wnid, name, pos in plan.val():
        yield _put(base / "val" / name, data("val", name, pos))


def _member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 1_330_000_000, 0o644
    tar.addfile(info, io.BytesIO(payload))


def _write_tar(out: Path, plan: Plan, data):
    tmp = out / "ILSVRC2012_img_train.tar.part"
    with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as outer:
        by_class: dict[str, list[tuple[str, int]]] = {}
        for wnid, name, pos in plan.train():
            by_class.setdefault(wnid, []).append((name, pos))
        for wnid in plan.classes:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as inner:
                for name, pos in by_class.get(wnid, []):
                    payload = data("train", name, pos)
                    _member(inner, name, payload)
                    yield len(payload)
            _member(outer, f"{wnid}.tar", buf.getvalue())
    os.replace(tmp, out / "ILSVRC2012_img_train.tar")
    if plan.val_per_class:
        tmp = out / "ILSVRC2012_img_val.tar.part"
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as val:
            # The real val tar lists its files by number.
            for wnid, name, pos in sorted(plan.val(), key=lambda t: t[1]):
                payload = data("val", name, pos)
                _member(val, name, payload)
                yield len(payload)
        os.replace(tmp, out / "ILSVRC2012_img_val.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layout", default="folder", choices=LAYOUTS)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--val-per-class", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pool", type=int, default=96, help="distinct rendered images (default: 96)")
    args = parser.parse_args()
    stats = generate(args.out, layout=args.layout, num_classes=args.classes, per_class=args.per_class,
                     val_per_class=args.val_per_class, seed=args.seed, pool=args.pool)
    print(f"{stats['files']} files, mean {stats['mean_bytes'] / 1e3:.0f} KB, {len(stats['classes'])} classes "
          f"in {args.out} ({args.layout})")


if __name__ == "__main__":
    main()
