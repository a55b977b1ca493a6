"""Encoded image bytes -> RGB PIL image, for images capgap already validated or made.

Training, evaluation, the captioner and the recaption stage read images that
``capgap curate`` or ``capgap synth`` wrote; they decode them here. Untrusted input
images go through the validating decoder of :mod:`capgap.transforms.decode` instead
(size bounds, bombs, EXIF, every PIL mode).

    image = rgb_image(row["image"], what=f"pair {uid}")
"""

from __future__ import annotations

import io

from PIL import Image


def rgb_image(blob: bytes, what: str = "image") -> Image.Image:
    """Decode ``blob`` fully and convert it to RGB; ``ValueError`` naming ``what`` if it fails."""
    try:
        with Image.open(io.BytesIO(blob)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, TypeError) as err:
        raise ValueError(f"{what}: image does not decode ({err})") from err
