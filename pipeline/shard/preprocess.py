"""Per-sample stages, each a pure function: decode-check → to RGB → resize → encode.

``process`` chains them for one input and returns the bytes to store. Any input that
cannot become a valid RGB image raises ``SkipSample`` with a reason; the shard task
records it and carries on, so one bad file never stops a build.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageFile

# Truncated files must fail, not decode into grey padding.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The bomb guard is ``max_pixels`` (checked from the header before decoding); PIL's own
# limit is disabled so that one option decides, and a bigger --max-pixels really works.
Image.MAX_IMAGE_PIXELS = None

# Errors a corrupt, truncated or non-image input raises inside PIL's decoders.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, Image.DecompressionBombError)


class SkipSample(Exception):
    """This input cannot be stored; ``str(exc)`` is the reason recorded in index.json.

    Reasons read ``"<kind>: <detail>"`` (or just ``"<kind>"``); summaries count skips by kind.
    """


@dataclasses.dataclass(frozen=True)
class Encoded:
    """One stored image: its extension (``jpg``/``png``), bytes and final size."""

    ext: str
    data: bytes
    width: int
    height: int
    reencoded: bool


def decode(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Fully decode ``data`` (not just the header) and return the loaded image.

    ``img.info["source_size"]`` holds the size in the file (a draft decode is smaller).

    ``draft_size`` lets libjpeg decode a JPEG at a reduced DCT scale no smaller than that
    size: it still entropy-decodes every byte of the stream (where truncation and
    corruption show up), but skips most of the inverse DCT, 3-5x faster.
    """
    if not data:
        raise SkipSample("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd metadata; decode errors still raise
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise SkipSample(f"too many pixels: {w}x{h} exceeds --max-pixels {max_pixels}")
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB" if img.mode == "RGB" else img.mode, draft_size)
            img.load()
            img.info["source_size"] = (w, h)
    except SkipSample:
        raise
    except Image.UnidentifiedImageError:
        raise SkipSample("not an image: unrecognised format") from None
    except _DECODE_ERRORS as exc:
        raise SkipSample(f"undecodable: {exc}") from None
    if img.width < 1 or img.height < 1:
        raise SkipSample("undecodable: image has no pixels")
    return img


def needs_conversion(img: Image.Image) -> bool:
    """True unless ``img`` is an 8-bit, 3-channel RGB JPEG that every decoder reads as-is."""
    return img.format != "JPEG" or img.mode != "RGB"


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: CMYK, grey, 16-bit, palette and alpha (composited on white)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img)
        # 16-bit data (PNG, TIFF) spans 0..65535; scale to 0..255 instead of clipping.
        if img.mode.startswith("I;16") or (arr.size and float(arr.max()) > 255):
            arr = arr.astype(np.float64) / 257.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(arr[..., None], 3, axis=2), "RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels carry arbitrary colour; a white background is what viewers show.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resize_short(img: Image.Image, short: int) -> Image.Image:
    """Scale so the shorter side is ``short`` (aspect kept); never upscale."""
    w, h = img.size
    if min(w, h) <= short:
        return img
    size = _short_side_size(w, h, short)
    # reducing_gap: box-reduce by an integer factor first, then a small antialiased resample.
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)


def _short_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    if w <= h:
        return short, max(1, round(h * short / w))
    return max(1, round(w * short / h)), short


def encode(img: Image.Image, ext: str, quality: int) -> bytes:
    """JPEG (``quality``, 4:2:0, baseline) or PNG bytes of an RGB image."""
    buf = io.BytesIO()
    if ext == "png":
        img.save(buf, format="PNG", compress_level=6)
    else:
        img.save(buf, format="JPEG", quality=quality, subsampling="4:2:0", optimize=False, progressive=False)
    return buf.getvalue()


def process_file(data: bytes, *, resize: int | None, quality: int, max_pixels: int) -> Encoded:
    """Stored form of one image file: the original bytes when already a fitting RGB JPEG, else a JPEG re-encode."""
    draft = None
    if resize is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                header = Image.open(io.BytesIO(data)) if data else None
            except (Image.UnidentifiedImageError, *_DECODE_ERRORS):
                header = None  # decode() below gives the reason
        if header is not None and min(header.size) > resize:
            draft = _short_side_size(*header.size, resize)
    if draft is None:
        # Validity check only: 1/8-scale DCT still reads the whole entropy-coded stream.
        draft = (1, 1)
        img = decode(data, max_pixels, draft)
        if not needs_conversion(img):
            w, h = img.info["source_size"]  # the real size, not the draft's
            return Encoded("jpg", data, w, h, reencoded=False)
        img = decode(data, max_pixels)  # conversion needs the full-resolution pixels
    else:
        img = decode(data, max_pixels, draft)
    img = to_rgb(img)
    if resize is not None:
        img = resize_short(img, resize)
    return Encoded("jpg", encode(img, "jpg", quality), img.width, img.height, reencoded=True)


def process_array(arr: np.ndarray, *, resize: int | None) -> Encoded:
    """PNG (lossless) of an HxW grey or HxWx3 RGB uint8 array; grey is replicated to R=G=B."""
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    img = Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")
    if resize is not None:
        img = resize_short(img, resize)
    return Encoded("png", encode(img, "png", 0), img.width, img.height, reencoded=True)
