"""Per-sample stages: pass-through, conversions to RGB, resize, and the skip reasons."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.shard.preprocess import SkipSample, jpeg_frame, process_array, process_file


def _jpeg(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _run(data: bytes, resize=None, max_pixels=10**8):
    return process_file(data, resize=resize, quality=90, max_pixels=max_pixels)


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    # Smooth gradients plus noise: compresses like a photograph, unlike a flat image.
    y, x = np.mgrid[0:300, 0:400]
    rng = np.random.default_rng(0)
    base = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], axis=2)
    return np.clip(base + rng.integers(-10, 10, base.shape), 0, 255).astype(np.uint8)


def test_rgb_jpeg_passes_through_byte_for_byte(photo):
    data = _jpeg(photo)
    out = _run(data)
    assert out.data == data and not out.reencoded
    assert (out.ext, out.width, out.height) == ("jpg", 400, 300)


def test_progressive_jpeg_passes_through(photo):
    data = _jpeg(photo, progressive=True)
    assert _run(data).data == data


def test_resize_short_keeps_aspect_and_reencodes(photo):
    out = _run(_jpeg(photo), resize=150)
    img = _decode(out.data)
    assert (img.width, img.height) == (out.width, out.height) == (200, 150)
    assert out.reencoded and img.format == "JPEG" and img.mode == "RGB"
    # Content survives the draft decode + resize: the horizontal gradient is still there.
    px = np.asarray(img, dtype=float)
    assert px[:, -20:, 0].mean() - px[:, :20, 0].mean() > 150


def test_resize_never_upscales(photo):
    data = _jpeg(photo)
    out = _run(data, resize=1000)
    assert out.data == data and (out.width, out.height) == (400, 300)


@pytest.mark.parametrize("mode", ["L", "CMYK", "P", "RGBA", "LA", "I;16", "PNG-as-JPEG"])
def test_every_mode_becomes_rgb_with_same_content(mode):
    grey = 200
    rgb = np.full((24, 32, 3), grey, dtype=np.uint8)
    buf = io.BytesIO()
    if mode == "I;16":
        Image.fromarray(np.full((24, 32), grey * 257, dtype=np.uint16)).save(buf, "PNG")
    elif mode == "PNG-as-JPEG":
        Image.fromarray(rgb).save(buf, "PNG")
    elif mode in ("L", "CMYK"):
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=95)
    else:
        Image.fromarray(rgb).convert(mode).save(buf, "PNG")
    out = _run(buf.getvalue())
    img = _decode(out.data)
    assert out.reencoded and img.format == "JPEG" and img.mode == "RGB"
    assert abs(np.asarray(img, dtype=float).mean() - grey) < 4


def test_transparent_pixels_become_white():
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG")
    assert np.asarray(_decode(_run(buf.getvalue()).data)).min() > 250


@pytest.mark.parametrize(
    "data, kind",
    [
        (b"", "empty file"),
        (b"definitely not an image", "not an image"),
    ],
)
def test_bad_bytes_are_skipped_with_reason(data, kind):
    with pytest.raises(SkipSample) as exc:
        _run(data)
    assert str(exc.value).split(":")[0] == kind


def test_corrupt_png_is_skipped(photo):
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[len(data) // 2] ^= 0xFF  # inside IDAT: the chunk CRC no longer matches
    with pytest.raises(SkipSample, match="^undecodable"):
        _run(bytes(data))


def test_truncated_jpeg_is_skipped(photo):
    data = _jpeg(photo)
    with pytest.raises(SkipSample, match="^undecodable"):
        _run(data[: len(data) * 2 // 3])


def test_max_pixels_guard(photo):
    with pytest.raises(SkipSample, match="^too many pixels: 400x300"):
        _run(_jpeg(photo), max_pixels=400 * 300 - 1)
    assert _run(_jpeg(photo), max_pixels=400 * 300).width == 400


def test_arrays_become_lossless_rgb_png():
    grey = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    out = process_array(grey, resize=None)
    img = _decode(out.data)
    assert out.ext == "png" and img.mode == "RGB"
    px = np.asarray(img)
    assert all(np.array_equal(px[..., c], grey) for c in range(3))


def test_jpeg_frame_matches_pillow(photo):
    for data in (_jpeg(photo), _jpeg(photo, progressive=True), _jpeg(photo[..., 0]), _jpeg(photo[:17, :5])):
        img = Image.open(io.BytesIO(data))
        assert jpeg_frame(data)[1:] == (img.height, img.width, len(img.getbands()))
    assert jpeg_frame(b"") is None and jpeg_frame(b"\x89PNG\r\n") is None and jpeg_frame(b"\xff\xd8\xff") is None


def test_header_check_copies_rgb_jpegs_unread_and_still_converts_the_rest(photo):
    data = _jpeg(photo)
    out = process_file(data, resize=None, quality=90, max_pixels=10**8, check="header")
    assert out.data == data and (out.width, out.height) == (400, 300) and not out.reencoded
    # The documented trade-off of --check header: damage inside the scan data is copied as is...
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    assert process_file(bytes(damaged), resize=None, quality=90, max_pixels=10**8, check="header").data == damaged
    # ...but a truncated file has no end-of-image marker, so the decoder sees it and skips it.
    with pytest.raises(SkipSample, match="^undecodable"):
        process_file(data[: len(data) * 2 // 3], resize=None, quality=90, max_pixels=10**8, check="header")
    # Anything that is not already an RGB JPEG still goes through decode and conversion.
    grey = _jpeg(photo[..., 0])
    converted = process_file(grey, resize=None, quality=90, max_pixels=10**8, check="header")
    assert converted.reencoded and _decode(converted.data).mode == "RGB"
    with pytest.raises(SkipSample, match="^too many pixels"):
        process_file(data, resize=None, quality=90, max_pixels=100, check="header")
    with pytest.raises(SkipSample, match="^empty file"):
        process_file(b"", resize=None, quality=90, max_pixels=100, check="header")
