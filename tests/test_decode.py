"""Decode + validate: every PIL mode to RGB, EXIF, bombs, truncation, captions, paths, dedup.

.venv/bin/python -m pytest -q tests/test_decode.py
"""

from __future__ import annotations

import io
import os
import struct
import unicodedata
import zlib

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image, ImageOps

from capgap.transforms.captions import CaptionConfig, _visible, normalise_caption
from capgap.transforms.decode import (
    DecodeConfig,
    DecodeRecords,
    decode_image,
    decode_record,
    exif_orientation,
    resolve_image_path,
)
from capgap.transforms.dedup import DedupDecode, DropDuplicateUids, FirstRefs
from capgap.transforms.readers import make_record
from capgap.transforms.reasons import Reason, RecordError


def encode(im: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def rgb_image(w: int = 40, h: int = 24, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def reason_of(fn, *args) -> Reason:
    with pytest.raises(RecordError) as info:
        fn(*args)
    return info.value.reason


CFG = DecodeConfig(min_side=8)


# --- modes -----------------------------------------------------------------------------------


def test_rgb_png_keeps_original_bytes():
    data = encode(rgb_image())
    out = decode_image(data, CFG)
    assert out.data == data and out.notes == []
    assert out.pixels.shape == (24, 40, 3) and out.pixels.dtype == np.uint8
    assert (out.width, out.height, out.format) == (40, 24, "PNG")


def test_palette_with_transparency_composites_over_background():
    im = Image.new("P", (16, 16), 0)
    im.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0  # index 0 (red) is transparent
    out = decode_image(encode(im), CFG)
    assert tuple(out.pixels[5, 5]) == (255, 255, 255)  # transparent -> white, not red or black
    assert tuple(out.pixels[0, 0]) == (0, 0, 255)
    assert any(n.startswith("mode:P->RGB") for n in out.notes) and "reencoded_png" in out.notes
    assert Image.open(io.BytesIO(out.data)).mode == "RGB"


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_modes(mode):
    im = Image.new(mode, (12, 12), (10, 0) if mode == "LA" else (10, 20, 30, 0))
    out = decode_image(encode(im), CFG)
    assert tuple(out.pixels[0, 0]) == (255, 255, 255)
    im = Image.new(mode, (12, 12), (10, 255) if mode == "LA" else (10, 20, 30, 255))
    out = decode_image(encode(im), CFG)
    assert tuple(out.pixels[0, 0]) == ((10, 10, 10) if mode == "LA" else (10, 20, 30))


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((10, 10), 32896, dtype=np.uint16)  # mid-grey in 16 bit
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    out = decode_image(encode(im), CFG)
    assert abs(int(out.pixels[0, 0, 0]) - 128) <= 1  # not clipped to 255


def test_cmyk_jpeg_and_one_bit():
    out = decode_image(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), CFG)
    r, g, b = out.pixels[8, 8]
    assert r > 200 and g < 60 and b < 60  # red
    out = decode_image(encode(Image.new("1", (16, 16), 1)), CFG)
    assert tuple(out.pixels[0, 0]) == (255, 255, 255)


def test_float_and_grey_modes():
    out = decode_image(encode(Image.new("L", (16, 16), 77)), CFG)
    assert tuple(out.pixels[0, 0]) == (77, 77, 77) and out.notes == ["mode:L->RGB"]
    tiff = encode(Image.fromarray(np.full((10, 10), 0.5, dtype=np.float32), mode="F"), "TIFF")
    out = decode_image(tiff, CFG)
    assert abs(int(out.pixels[0, 0, 0]) - 128) <= 1


def test_animated_gif_takes_first_frame_and_records_it():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    out = decode_image(buffer.getvalue(), CFG)
    assert out.pixels[4, 4, 0] > 200 and out.pixels[4, 4, 1] < 50
    assert any(n.startswith("first_frame_of:3") for n in out.notes)


def test_exif_orientation_is_applied():
    im = rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(im, "JPEG", exif=exif.tobytes()), CFG)
    assert (out.width, out.height) == (20, 40)
    assert "exif_orientation:6" in out.notes and "reencoded_jpeg" in out.notes
    assert out.format == "JPEG" == Image.open(io.BytesIO(out.data)).format


# --- what curated/ stores --------------------------------------------------------------------


def photo(name: str) -> Image.Image:
    """A real photo shipped with scikit-learn (china.jpg, flower.jpg: 640x427 JPEGs)."""
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image(name))


def exif_rotated(im: Image.Image, orientation: int, **save) -> bytes:
    """``im`` as a JPEG whose EXIF says ``orientation`` (what a phone camera writes)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), **save)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("name", ["china.jpg", "flower.jpg"])
@pytest.mark.parametrize("orientation", [3, 6, 8])
@pytest.mark.parametrize("save", [{"quality": 90}, {"quality": 75, "subsampling": 0}])
def test_exif_rotated_jpeg_stays_a_jpeg_of_about_its_size(name, orientation, save):
    pristine = photo(name)
    data = exif_rotated(pristine, orientation, **save)
    out = decode_image(data, DecodeConfig())
    stored = Image.open(io.BytesIO(out.data))
    assert out.format == stored.format == "JPEG"
    assert len(out.data) <= 1.2 * len(data)  # a PNG of it is ~5x
    assert stored.getexif().get(0x0112) is None  # upright: no reader rotates it twice
    want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
    got = np.asarray(stored.convert("RGB"))
    assert got.shape == want.shape == (out.height, out.width, 3)
    # JPEG tolerance: one more generation at the source's own tables adds less error than
    # the source's own compression had (31.8-48 dB here against 30.0-37.1 dB).
    source_loss = psnr(
        np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(pristine)
    )
    assert psnr(got, want) > max(30.0, source_loss)
    assert np.abs(got.astype(int) - want).mean() < 4.5


def test_exif_rotated_greyscale_jpeg_stays_greyscale_jpeg():
    data = exif_rotated(photo("flower.jpg").convert("L"), 6)
    out = decode_image(data, DecodeConfig())
    stored = Image.open(io.BytesIO(out.data))
    assert (out.format, stored.format, stored.mode) == ("JPEG", "JPEG", "L")
    assert len(out.data) <= 1.2 * len(data)


def smooth(w: int = 40, h: int = 24) -> Image.Image:
    """A gradient: lossy codecs keep it within a few levels (noise they do not)."""
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], axis=-1)
    return Image.fromarray(arr.astype(np.uint8), mode="RGB")


def _webp_lossy_rotated() -> bytes:
    return exif_rotated_as(smooth(), "WEBP", quality=80)


def exif_rotated_as(im: Image.Image, fmt: str, **save) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, fmt, exif=exif.tobytes(), **save)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


STORED_CASES = {
    "rgb-png": (lambda: encode(smooth()), "PNG"),
    "rgb-jpeg": (lambda: encode(smooth(), "JPEG"), "JPEG"),
    "rotated-jpeg": (lambda: exif_rotated(smooth(), 6), "JPEG"),
    "cmyk-jpeg": (lambda: encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"), "JPEG"),
    "rotated-webp-lossy": (_webp_lossy_rotated, "WEBP"),
    "rgba-webp-lossless": (
        lambda: encode(Image.new("RGBA", (16, 16), (1, 2, 3, 100)), "WEBP", lossless=True),
        "WEBP",
    ),
    "palette-png": (lambda: encode(smooth().convert("P")), "PNG"),
    "rotated-png": (lambda: exif_rotated_as(smooth(), "PNG"), "PNG"),
    "tiff": (lambda: encode(smooth(), "TIFF"), "PNG"),
    "bmp": (lambda: encode(smooth(), "BMP"), "PNG"),
    "gif": (_animated_gif, "PNG"),
    "mpo": (  # a phone's multi-picture JPEG: its first frame, stored as a JPEG
        lambda: encode(smooth(), "MPO", save_all=True, append_images=[Image.new("RGB", (9, 9))]),
        "JPEG",
    ),
}


@pytest.mark.parametrize("case", sorted(STORED_CASES))
def test_image_format_names_the_stored_bytes(case):
    make, stored_format = STORED_CASES[case]
    out = decode_image(make(), CFG)
    stored = Image.open(io.BytesIO(out.data))
    assert out.format == stored.format == stored_format
    assert stored.size == (out.width, out.height)
    got = np.asarray(stored.convert("RGB"))
    pixels = np.asarray(Image.fromarray(out.pixels))  # no downscale at these sizes
    lossy = stored_format != "PNG" and not case.endswith("lossless")
    assert np.abs(got.astype(int) - pixels).mean() <= (3.0 if lossy else 0.0)


def test_webp_lossless_is_told_from_lossy():
    from capgap.transforms.decode import _webp_lossless

    assert _webp_lossless(encode(rgb_image(), "WEBP", lossless=True))
    assert not _webp_lossless(encode(rgb_image(), "WEBP", quality=80))
    alpha = encode(Image.new("RGBA", (16, 16), (1, 2, 3, 100)), "WEBP", quality=80)
    assert not _webp_lossless(alpha)


def _with_orientation(fmt: str) -> bytes:
    """A 40x20 image whose metadata says orientation 6, the way ``fmt`` stores it."""
    im = rgb_image(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    if fmt == "PNG-XMP":
        from PIL import PngImagePlugin

        info = PngImagePlugin.PngInfo()
        xmp = '<x:xmpmeta><rdf:Description tiff:Orientation="6"/></x:xmpmeta>'
        info.add_itxt("XML:com.adobe.xmp", xmp)
        return encode(im, "PNG", pnginfo=info)
    if fmt == "TIFF":
        return encode(im, "TIFF", tiffinfo={0x0112: 6})
    return encode(im, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "PNG-XMP"])
def test_orientation_is_found_wherever_pil_finds_it(fmt):
    # exif_orientation skips getexif() for images without metadata; it must still see every
    # place getexif() reads an orientation from.
    data = _with_orientation(fmt)
    im = Image.open(io.BytesIO(data))
    assert im.getexif().get(0x0112) == 6
    assert exif_orientation(Image.open(io.BytesIO(data))) == 6
    out = decode_image(data, CFG)
    assert (out.width, out.height) == (20, 40)
    if fmt != "TIFF":  # PIL turns a TIFF upright itself when it loads the pixels
        assert "exif_orientation:6" in out.notes
    assert exif_orientation(Image.open(io.BytesIO(encode(rgb_image(40, 20), "PNG")))) == 1


def test_large_images_are_downscaled_for_the_model_only():
    data = encode(rgb_image(200, 100))
    out = decode_image(data, DecodeConfig(model_max_side=50))
    assert out.pixels.shape == (50, 100, 3)
    assert out.data == data and (out.width, out.height) == (200, 100)


# --- failures --------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        return struct.pack(">I", len(body)) + kind + body + crc

    idat = zlib.compress(b"\x00" * 64)  # a few bytes of pixel data: the header lies
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_failure_reasons():
    good = encode(rgb_image(64, 64), "JPEG")
    assert reason_of(decode_image, b"", CFG) is Reason.IMAGE_EMPTY
    assert reason_of(decode_image, None, CFG) is Reason.IMAGE_MISSING
    assert reason_of(decode_image, b"not an image at all", CFG) is Reason.IMAGE_UNDECODABLE
    assert reason_of(decode_image, good[: len(good) // 2], CFG) is Reason.IMAGE_TRUNCATED
    assert reason_of(decode_image, good, DecodeConfig(max_bytes=100)) is (
        Reason.IMAGE_BYTES_TOO_LARGE
    )
    assert reason_of(decode_image, good, DecodeConfig(max_pixels=1000)) is Reason.IMAGE_TOO_LARGE
    assert reason_of(decode_image, encode(rgb_image(4, 4)), CFG) is Reason.IMAGE_TOO_SMALL
    assert reason_of(decode_image, encode(rgb_image(200, 10)), CFG) is Reason.IMAGE_BAD_ASPECT


def test_decompression_bomb_header_is_rejected_without_decoding():
    # 20000 x 20000 = 400M pixels: PIL raises DecompressionBombError on open.
    bomb = _png_header(20000, 20000)
    big = DecodeConfig(max_pixels=10**12)  # our bound out of the way: PIL's own one answers
    assert reason_of(decode_image, bomb, big) is Reason.IMAGE_TOO_LARGE
    assert reason_of(decode_image, _png_header(9000, 9000), CFG) is Reason.IMAGE_TOO_LARGE


def test_corrupt_pixel_data():
    data = bytearray(encode(rgb_image(64, 64)))
    idat = data.find(b"IDAT")
    data[idat + 20 : idat + 60] = b"\x00" * 40  # break the zlib stream
    reason = reason_of(decode_image, bytes(data), CFG)
    assert reason in (Reason.IMAGE_CORRUPT, Reason.IMAGE_TRUNCATED)


# --- captions --------------------------------------------------------------------------------


def test_caption_normalisation():
    ccfg = CaptionConfig(max_chars=40)
    text, notes = normalise_caption("  a\tred\u00a0\u00a0circle\x00\u200b\nnow ", ccfg)
    assert text == "a red circle now" and notes == []
    assert normalise_caption("cafe\u0301", ccfg)[0] == "caf\u00e9"  # NFC
    # The printable-ASCII fast path gives what the full path gives.
    for ascii_text in ("  a red   circle ", "x", "a,b;c (d) [e] {f} 'g' ~!@#$%^&*_+=|<>?/"):
        assert normalise_caption(ascii_text, ccfg)[0] == " ".join(
            unicodedata.normalize("NFC", _visible(ascii_text)).split()
        )
    assert normalise_caption("a \u202eevil".encode(), ccfg)[0] == "a evil"
    assert reason_of(normalise_caption, None, ccfg) is Reason.CAPTION_MISSING
    assert reason_of(normalise_caption, " \t\x00 ", ccfg) is Reason.CAPTION_EMPTY
    assert reason_of(normalise_caption, b"\xff\xfe bad", ccfg) is Reason.CAPTION_NOT_UTF8
    assert reason_of(normalise_caption, "x\udcff", ccfg) is Reason.CAPTION_NOT_UTF8
    assert reason_of(normalise_caption, 42, ccfg) is Reason.CAPTION_TYPE_INVALID
    assert reason_of(normalise_caption, "word " * 20, ccfg) is Reason.CAPTION_TOO_LONG
    text, notes = normalise_caption("word " * 20, CaptionConfig(40, "truncate"))
    assert len(text) <= 40 and text.endswith("word") and notes == ["caption_truncated"]


# --- paths -----------------------------------------------------------------------------------


def test_paths_are_confined_to_the_root(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    (root / "a.png").write_bytes(encode(rgb_image()))
    (tmp_path / "secret.png").write_bytes(encode(rgb_image()))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    assert resolve_image_path("a.png", str(root)) == str(root / "a.png")
    assert resolve_image_path(str(root / "a.png"), str(root)) == str(root / "a.png")
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "http://x/a.png"):
        assert reason_of(resolve_image_path, bad, str(root)) is Reason.PATH_OUTSIDE_ROOT, bad
    for bad in ("", "  ", "a\x00.png", None, 7):
        assert reason_of(resolve_image_path, bad, str(root)) is Reason.PATH_INVALID
    assert resolve_image_path("x/../b.jpg", "gs://bucket/img") == "gs://bucket/img/b.jpg"
    assert reason_of(resolve_image_path, "../b.jpg", "gs://bucket/img") is (
        Reason.PATH_OUTSIDE_ROOT
    )


def test_decode_record_reads_paths(tmp_path):
    (tmp_path / "a.png").write_bytes(encode(rgb_image()))
    (tmp_path / "d").mkdir()
    ccfg = CaptionConfig()

    def rec(path):
        return make_record(
            uid="u", source="s", index=0, image_path=path, caption="c", image_root=str(tmp_path)
        )

    assert decode_record(rec("a.png"), CFG, ccfg)["width"] == 40
    assert reason_of(decode_record, rec("nope.png"), CFG, ccfg) is Reason.PATH_MISSING
    assert reason_of(decode_record, rec("d"), CFG, ccfg) is Reason.PATH_UNREADABLE
    record = make_record(uid="u", source="s", index=0, caption="c")
    assert reason_of(decode_record, record, CFG, ccfg) is Reason.IMAGE_MISSING


# --- Beam transforms -------------------------------------------------------------------------


def test_decode_records_dead_letters_each_bad_record():
    good = encode(rgb_image())
    records = [
        make_record(uid="ok", source="s", index=0, image=good, caption="a circle"),
        make_record(uid="empty", source="s", index=1, image=b"", caption="a circle"),
        make_record(uid="nocap", source="s", index=2, image=good, caption=None),
        make_record(
            uid="readerr",
            source="s",
            index=3,
            error=(Reason.SHARD_UNREADABLE.value, "OSError", "boom"),
        ),
    ]
    with TestPipeline() as p:
        out = (
            p | beam.Create([(r["uid"], r) for r in records]) | DecodeRecords(CFG, CaptionConfig())
        )
        assert_that(
            out.ok | "OkUid" >> beam.Map(lambda kv: (kv[0], kv[1]["caption"])),
            equal_to([("ok", "a circle")]),
            label="ok",
        )
        assert_that(
            out.errors | beam.Map(lambda r: (r["uid"], r["stage"], r["reason"])),
            equal_to(
                [
                    ("empty", "decode", "image_empty"),
                    ("nocap", "decode", "caption_missing"),
                    ("readerr", "read", "shard_unreadable"),
                ]
            ),
            label="errors",
        )


def test_duplicate_uids_keep_the_first_by_source_and_index():
    records = [
        make_record(uid="a", source="s2", index=0, caption="x"),
        make_record(uid="a", source="s1", index=5, caption="y"),
        make_record(uid="a", source="s1", index=7, caption="z"),
        make_record(uid="b", source="s1", index=1, caption="w"),
    ]
    with TestPipeline() as p:
        out = p | beam.Create([(r["uid"], r) for r in records]) | DropDuplicateUids()
        assert_that(
            out.ok | beam.Map(lambda kv: (kv[0], kv[1]["caption"])),
            equal_to([("a", "y"), ("b", "w")]),
            label="ok",
        )
        assert_that(
            out.errors | beam.Map(lambda r: (r["source"], r["source_index"], r["reason"])),
            equal_to([("s2", 0, "duplicate_uid"), ("s1", 7, "duplicate_uid")]),
            label="dups",
        )


def test_dedup_decode_in_one_step_matches_dedup_then_decode():
    image = encode(Image.new("RGB", (32, 32), (200, 30, 30)))
    records = [
        make_record(uid="a", source="s2", index=0, image=image, caption="x"),
        make_record(uid="a", source="s1", index=5, image=image, caption="y"),
        make_record(uid="s1#3", source="s1", index=3, image=image, caption="derived"),
        make_record(uid="s1#3", source="s0", index=0, image=image, caption="real"),
        make_record(uid="b", source="s1", index=1, image=b"broken", caption="w"),
        make_record(uid="b", source="s1", index=2, image=image, caption="later copy"),
    ]
    elements = [(r["uid"], r) for r in records]
    refs = [(uid, (r["source"], r["source_index"])) for uid, r in elements]
    key = {"ok": lambda kv: (kv[0], kv[1]["caption"]), "errors": lambda r: (r["uid"], r["reason"])}
    expected = {
        "ok": [("a", "y"), ("s1#3#derived", "derived"), ("s1#3", "real")],
        "errors": [("a", "duplicate_uid"), ("b", "image_undecodable"), ("b", "duplicate_uid")],
    }
    with TestPipeline() as p:
        first_refs = p | "Refs" >> beam.Create([refs[:2], refs[2:]]) | FirstRefs(2)  # blocks
        fused = (
            p
            | "Records" >> beam.Create(elements)
            | DedupDecode(first_refs, DecodeConfig(), CaptionConfig())
        )
        unique = p | "Records2" >> beam.Create(elements) | DropDuplicateUids()
        apart = unique.ok | DecodeRecords(DecodeConfig(), CaptionConfig())
        for tag in ("ok", "errors"):
            assert_that(
                fused[tag] | f"K{tag}" >> beam.Map(key[tag]),
                equal_to(expected[tag]),
                label=f"fused_{tag}",
            )
        assert_that(
            apart.ok | "Kapart" >> beam.Map(key["ok"]), equal_to(expected["ok"]), label="apart_ok"
        )
        assert_that(
            (unique.errors, apart.errors) | beam.Flatten() | "Kerr" >> beam.Map(key["errors"]),
            equal_to(expected["errors"]),
            label="apart_errors",
        )


@pytest.mark.parametrize(
    "caption",
    [
        "\u3164",
        "\u200d\u200d",
        " \u2800 ",
        "\u115f\u1160",
        "\u200b\u00ad\ufeff",
        "\u0301",
        "\u180e ",
    ],
)
def test_captions_with_no_visible_character_are_empty(caption):
    assert reason_of(normalise_caption, caption, CaptionConfig()) is Reason.CAPTION_EMPTY


def test_zwj_and_emoji_captions_stay():
    assert (
        normalise_caption("\U0001f469\u200d\U0001f467", CaptionConfig())[0]
        == "\U0001f469\u200d\U0001f467"
    )
