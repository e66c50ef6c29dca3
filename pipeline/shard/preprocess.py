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


def process_file(data: bytes, *, resize: int | None, quality: int, max_pixels: int,
                 check: str = "decode") -> Encoded:
    """Stored form of one image file: the original bytes when already a fitting RGB JPEG, else a JPEG re-encode.

    ``check="decode"`` proves every pass-through JPEG decodes; ``check="header"`` trusts a
    JPEG whose frame header says 8-bit 3-component and that ends with its end-of-image
    marker, and copies it unread (tar-like speed; corruption inside the entropy-coded data
    is only caught when a loader reads it). Images that are converted or resized, and
    files that fail those checks, are always fully decoded.
    """
    if check == "header" and resize is None:
        passed = _header_pass_through(data, max_pixels)
        if passed is not None:
            return passed
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


def _header_pass_through(data: bytes, max_pixels: int) -> Encoded | None:
    """The original bytes when the JPEG header alone says: 8-bit, 3-component, Huffman-coded, within ``max_pixels``.

    Reads the markers up to the frame header directly: PIL's ``Image.open`` costs ~0.4 ms
    an image, more than copying it. ``None`` sends the image down the decoding path.
    """
    if data.rstrip(b"\0")[-2:] != b"\xff\xd9":
        return None  # no end-of-image marker: truncated (or trailing bytes); let the decoder judge it
    frame = jpeg_frame(data)
    if frame is None:
        return None
    precision, height, width, components = frame
    if precision != 8 or components != 3 or width * height > max_pixels or not width or not height:
        return None
    return Encoded("jpg", data, width, height, reencoded=False)


# Start-of-frame markers of baseline, extended and progressive Huffman JPEGs: what every decoder
# (libjpeg-turbo, nvJPEG) reads. Lossless, hierarchical and arithmetic-coded frames take the decode path.
_SOF_HUFFMAN = (0xC0, 0xC1, 0xC2)


def jpeg_frame(data: bytes) -> tuple[int, int, int, int] | None:
    """``(precision, height, width, components)`` from a JPEG's frame header, or None if not a plain JPEG."""
    if data[:2] != b"\xff\xd8":
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xD0 <= marker <= 0xD9 or marker == 0x01:  # a marker without a length before the frame: malformed
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if marker not in _SOF_HUFFMAN or i + 10 > n:
                return None
            return data[i + 4], int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), \
                data[i + 9]
        if marker == 0xDA or length < 2:  # scan data before any frame header: malformed
            return None
        i += 2 + length
    return None

