"""DecompressionBombWarning is an error whether a worker installed the filter once
(``raise_bomb_warnings``, DecodeFn.setup) or ``decode_image`` sets it per image.

.venv/bin/python -m pytest -q tests/test_decode_bomb_filter.py
"""

from __future__ import annotations

import contextlib
import struct
import warnings
import zlib

import pytest
from PIL import Image

from capgap.transforms.decode import (
    DecodeConfig,
    bomb_warnings_as_errors,
    decode_image,
    raise_bomb_warnings,
)
from capgap.transforms.reasons import Reason, RecordError


def png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("installed", [False, True])
def test_a_bomb_warning_becomes_image_too_large(installed):
    # 10000 x 10000 = 100M pixels: above PIL's MAX_IMAGE_PIXELS (~89M), below twice it, so
    # PIL only warns; capgap's own bound is lifted out of the way.
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():  # leaves the process's filters as they were
        warnings.resetwarnings()
        if installed:
            raise_bomb_warnings()
            assert isinstance(bomb_warnings_as_errors(), contextlib.nullcontext)
        else:
            assert not isinstance(bomb_warnings_as_errors(), contextlib.nullcontext)
        with pytest.raises(RecordError) as err:
            decode_image(png_header(10000, 10000), DecodeConfig(max_pixels=10**9))
        assert err.value.reason is Reason.IMAGE_TOO_LARGE
        assert "DecompressionBomb" in err.value.error_class
