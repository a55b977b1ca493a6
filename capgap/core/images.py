"""Encoded image bytes -> RGB PIL image, for images capgap already validated or made.

Training, evaluation, the captioner and the recaption stage read images that
``capgap curate`` or ``capgap synth`` wrote; they decode them here. Untrusted input
images go through the validating decoder of :mod:`capgap.transforms.decode` instead
(size bounds, bombs, EXIF, every PIL mode).

An image cell is either encoded bytes or, as ``capgap curate`` writes it and Hugging Face
``datasets`` stores an ``Image()`` feature, a ``{"bytes": ..., "path": ...}`` struct;
both are accepted (:func:`image_bytes`).

    image = rgb_image(row["image"], what=f"pair {uid}")
"""

from __future__ import annotations

import io
from typing import Any

from PIL import Image


def image_bytes(cell: Any, what: str = "image") -> bytes:
    """The encoded bytes of an image cell: bytes, or an HF ``{"bytes", "path"}`` struct
    with its bytes embedded; ``ValueError`` naming ``what`` otherwise."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if isinstance(cell, bytes | bytearray | memoryview):
        return bytes(cell)
    raise ValueError(f"{what}: no embedded image bytes (got {type(cell).__name__})")


def rgb_image(blob: bytes | dict[str, Any], what: str = "image") -> Image.Image:
    """Decode an image cell (bytes or an HF image struct) fully and convert it to RGB;
    ``ValueError`` naming ``what`` if it fails."""
    blob = image_bytes(blob, what)
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: image does not decode ({err})") from err
