"""Stored bytes / source bytes of EXIF-rotated JPEGs, as ``capgap curate`` writes them.

Phone photos are JPEGs whose EXIF says how to turn them upright; capgap applies the
orientation, so it cannot keep the source bytes. This prints, per photo and orientation,
the size of what ``curated/`` stores (``transforms/decode.py``: a JPEG re-encoded with the
source's quantisation tables and subsampling) against the source's size, beside the PNG
capgap stored before (the baseline, measured here in the same process), and the PSNR of
the stored pixels against PIL's ``ImageOps.exif_transpose`` decode of the source. Target:
stored / source <= 1.2.

The photos are scikit-learn's samples (china.jpg, flower.jpg, 640x427), saved as a phone
would (JPEG quality 90 and 95, 4:2:0, EXIF orientation 6 or 8), and china.jpg scaled to
4000x3000 (12 MP), plain and with sensor-like noise (sigma 3), which a scaled-up photo
otherwise lacks.

    python benchmarks/stored_image_size.py
"""

from __future__ import annotations

from capgap.core.console import quiet_third_party_output

quiet_third_party_output()  # before Beam's import logs its apitools line

import io
import time

import numpy as np
from PIL import Image, ImageOps
from sklearn.datasets import load_sample_image

from capgap.transforms.decode import DecodeConfig, decode_image


def phone_jpeg(im: Image.Image, orientation: int, quality: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=quality, subsampling=2, exif=exif.tobytes())
    return buffer.getvalue()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def photos() -> dict[str, Image.Image]:
    china = Image.fromarray(load_sample_image("china.jpg"))
    big = china.resize((4000, 3000), Image.Resampling.LANCZOS)
    rng = np.random.default_rng(0)
    noisy = np.asarray(big).astype(np.float32) + rng.normal(0, 3, (3000, 4000, 3))
    return {
        "china 640x427": china,
        "flower 640x427": Image.fromarray(load_sample_image("flower.jpg")),
        "china 4000x3000": big,
        "china 4000x3000 +noise": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
    }


def main() -> int:
    cfg = DecodeConfig()
    print(
        f"{'photo':24s} {'q':>3s} {'or':>2s} {'source':>10s} {'stored':>10s} {'ratio':>6s} "
        f"{'png ratio':>9s} {'psnr dB':>7s} {'decode s':>8s}"
    )
    ratios = []
    for name, im in photos().items():
        for quality in (90, 95):
            for orientation in (6, 8):
                data = phone_jpeg(im, orientation, quality)
                start = time.perf_counter()
                out = decode_image(data, cfg)
                seconds = time.perf_counter() - start
                upright = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
                png = io.BytesIO()
                upright.save(png, "PNG", compress_level=1)  # what capgap stored before
                stored = Image.open(io.BytesIO(out.data))
                assert out.format == stored.format == "JPEG"
                quality_db = psnr(np.asarray(stored.convert("RGB")), np.asarray(upright))
                ratio = len(out.data) / len(data)
                ratios.append(ratio)
                print(
                    f"{name:24s} {quality:3d} {orientation:2d} {len(data):10d} "
                    f"{len(out.data):10d} {ratio:6.3f} {len(png.getvalue()) / len(data):9.2f} "
                    f"{quality_db:7.1f} {seconds:8.3f}"
                )
    print(f"max stored/source ratio {max(ratios):.3f} (target <= 1.2)")
    return 0 if max(ratios) <= 1.2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
