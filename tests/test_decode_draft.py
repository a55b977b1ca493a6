"""JPEG draft decoding (DCT scaling) for the model's image: same geometry, close pixels, stored
bytes untouched, and never used where ``curated/`` would re-encode the pixels.

.venv/bin/python -m pytest -q tests/test_decode_draft.py
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import sklearn
from PIL import Image

from capgap.transforms.decode import DecodeConfig, decode_image, draft_jpeg
from capgap.transforms.reasons import Reason, RecordError

PHOTO = os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images", "china.jpg")


def photo(width: int, height: int, mode: str = "RGB") -> Image.Image:
    return Image.open(PHOTO).convert("RGB").resize((width, height)).convert(mode)


def jpeg(im: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format="JPEG", quality=92, **kwargs)
    return buffer.getvalue()


CFG = DecodeConfig(model_max_side=64)


def test_a_large_jpeg_is_drafted_to_at_least_the_model_side():
    im = Image.open(io.BytesIO(jpeg(photo(480, 320))))
    assert draft_jpeg(im, CFG) == (480, 320)
    assert min(im.size) >= 64 and im.size[0] < 480  # libjpeg's 1/4 scale: 120x80
    im.load()
    assert im.size == (120, 80)


def test_drafted_model_pixels_match_a_full_decode():
    data = jpeg(photo(480, 320))
    drafted = decode_image(data, CFG)
    full = decode_image(data, DecodeConfig(model_max_side=64, jpeg_draft=False))
    assert drafted.pixels.shape == full.pixels.shape == (64, 96, 3)
    diff = np.abs(drafted.pixels.astype(float) - full.pixels.astype(float))
    assert diff.mean() < 4.0, diff.mean()
    assert drafted.data is data and (drafted.width, drafted.height) == (480, 320)
    assert drafted.notes == full.notes


@pytest.mark.parametrize(
    "size,fmt,mode",
    [((120, 100), "JPEG", "RGB"), ((480, 320), "PNG", "RGB"), ((480, 320), "JPEG", "CMYK")],
)
def test_no_draft_when_small_not_jpeg_or_re_encoded(size, fmt, mode):
    buffer = io.BytesIO()
    photo(*size, mode=mode).save(buffer, format=fmt)
    im = Image.open(io.BytesIO(buffer.getvalue()))
    assert draft_jpeg(im, CFG) is None and im.size == size


def test_rotated_jpeg_keeps_its_full_size_re_encoded_copy():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = decode_image(jpeg(photo(480, 320), exif=exif.tobytes()), CFG)
    assert (out.width, out.height) == (320, 480)
    assert Image.open(io.BytesIO(out.data)).size == (320, 480)  # from the full decode
    assert out.pixels.shape == (96, 64, 3)


def test_keep_original_bytes_off_stores_full_size_pixels():
    cfg = DecodeConfig(model_max_side=64, keep_original_bytes=False)
    out = decode_image(jpeg(photo(480, 320)), cfg)
    assert Image.open(io.BytesIO(out.data)).size == (480, 320)


def test_a_truncated_large_jpeg_still_fails():
    data = jpeg(photo(480, 320))
    with pytest.raises(RecordError) as err:
        decode_image(data[: len(data) // 2], CFG)
    assert err.value.reason == Reason.IMAGE_TRUNCATED
