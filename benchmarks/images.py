"""ImageNet-like benchmark images from real photographs shipped with installed packages.

Random crops, rescales and flips of scikit-learn's and matplotlib's sample photos
(natural content, so JPEG sizes and decode costs resemble ImageNet's), 400-500 px on
the long side, varied aspect ratios, JPEG quality 90, in an ImageFolder tree.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def photo_paths() -> list[Path]:
    """Real photographs available in this environment (at least one, else ``RuntimeError``)."""
    found: list[Path] = []
    try:
        import sklearn

        found += sorted((Path(sklearn.__file__).parent / "datasets" / "images").glob("*.jpg"))
    except ImportError:
        pass
    try:
        import matplotlib

        found += sorted((Path(matplotlib.get_data_path()) / "sample_data").glob("*.jpg"))
    except ImportError:
        pass
    if not found:
        raise RuntimeError("no sample photographs found: install scikit-learn or matplotlib")
    return found


def _variant(photo: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = photo.size
    aspect = float(np.exp(rng.uniform(np.log(3 / 5), np.log(5 / 3))))  # ImageNet spans ~3:5 .. 5:3
    area = rng.uniform(0.25, 1.0) * w * h
    cw = int(min(w, np.sqrt(area * aspect)))
    ch = int(min(h, cw / aspect))
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch))
    long_side = int(rng.integers(400, 501))
    scale = long_side / max(cw, ch)
    img = img.resize((max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def make_imagenet_like(root: Path, n: int, num_classes: int = 10, seed: int = 0) -> Path:
    """ImageFolder of ``n`` JPEGs in ``num_classes`` classes under ``root``; reuses a complete tree.

    Deterministic for a seed. ``root/.complete.json`` marks a finished tree with its parameters.
    """
    root = Path(root)
    marker = root / ".complete.json"
    params = {"n": n, "num_classes": num_classes, "seed": seed, "version": 1}
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    photos = [Image.open(p).convert("RGB") for p in photo_paths()]
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _variant(photos[int(rng.integers(len(photos)))], rng)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        (root / f"n{i % num_classes:08d}" / f"img_{i:07d}.JPEG").write_bytes(buf.getvalue())
    marker.write_text(json.dumps(params))
    return root
