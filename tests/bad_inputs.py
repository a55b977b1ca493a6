"""Generate the bad-input corpus of ``capgap curate`` (nothing is downloaded).

Every *kind* of bad (or valid-but-odd) input is one entry of :data:`KINDS`: how to
make it, which readers it makes sense for, where its row(s) must land (outcome and
reason code from :mod:`capgap.transforms.reasons`) and, for rows that must be
curated, a check of the conversion (RGB mode, EXIF rotation applied, ...).
:func:`build` writes the corpus for one reader (``parquet``, ``webdataset``,
``hf``, ``csv``) under a folder and returns a :class:`Corpus`: the input
patterns and, for every input row, its ``(source, source_index)`` and the
expected outcome, so a test can match each output row back to its kind.

    corpus = build("parquet", tmp_path)
    plans = corpus.plans()                  # one InputPlan per input pattern
    corpus.cases                            # [Case(kind, source, index, expected), ...]

    python tests/bad_inputs.py OUT_DIR      # write all four corpora, print the cases
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from capgap.core.images import image_bytes

READERS = ("parquet", "webdataset", "hf", "csv")
ALL = frozenset(READERS)
BYTES_READERS = frozenset({"parquet", "webdataset", "hf"})

#: Decode bounds the corpus is built for (``DecodeConfig(**DECODE_OVERRIDES)``).
DECODE_OVERRIDES = {"max_bytes": 256 * 1024}
PADDING_BYTES = 300 * 1024  # > max_bytes: makes "oversized_bytes"

CURATED, REJECTED, ERRORS = "curated", "rejected", "errors"


# --- expectations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """Where a row must land: outcome and one of ``reasons`` (usually exactly one)."""

    outcome: str
    reasons: tuple[str, ...]

    def matches(self, outcome: str, reason: str) -> bool:
        return outcome == self.outcome and reason in self.reasons


def ok() -> Expected:
    """A row that passes decoding (curated unless the policy rejects it)."""
    return Expected(CURATED, ("passed", "high_imbalance"))


def err(*reasons: str) -> Expected:
    return Expected(ERRORS, tuple(reasons))


@dataclass(frozen=True)
class Case:
    """One input row: its kind, where it sits in the input, where it must land."""

    kind: str
    source: str
    index: int
    expected: Expected
    uid: str | None = None
    pattern: int = 0  # which of the corpus's input patterns holds it


@dataclass
class Row:
    """One generated record, before it is written in a reader's format."""

    kind: str
    uid: str
    image: bytes | None
    caption: Any  # str | bytes | None | int
    expected: Expected
    score: float = 0.5
    ext: str = "png"  # image file / tar member extension
    path: str | None = None  # an image path (path kinds) instead of bytes
    txt: bool = True  # webdataset: write a .txt member (else the caption goes to .json, if any)


Check = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class Kind:
    name: str
    description: str
    readers: frozenset[str]
    check: Check | None = None  # for decoded rows: the conversion was right


KINDS: dict[str, Kind] = {}


def _kind(name: str, description: str, readers=ALL, check: Check | None = None) -> None:
    KINDS[name] = Kind(name, description, frozenset(readers), check)


def kinds_for(reader: str) -> list[str]:
    return [k.name for k in KINDS.values() if reader in k.readers]


# --- images ------------------------------------------------------------------------------------

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 40), (20, 40, 220), (255, 255, 255)


def _save(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def halves(size=(48, 32), left=RED, right=BLUE, mode="RGB") -> Image.Image:
    """Left half one colour, right half another (easy to check after conversions)."""
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = left
    arr[:, w // 2 :] = right
    return Image.fromarray(arr, "RGB").convert(mode)


def valid_png() -> bytes:
    return _save(halves(), "PNG")


def valid_jpeg() -> bytes:
    return _save(halves(), "JPEG", quality=95)


def noise_jpeg() -> bytes:
    """A 64x64 noise JPEG: most of its bytes are scan data (so a cut lands in the pixels)."""
    arr = np.random.default_rng(11).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return _save(Image.fromarray(arr, "RGB"), "JPEG", quality=90)


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` RGB with (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16) if idat is None else idat
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def corrupt_png() -> bytes:
    """A 48x32 PNG whose chunks have valid CRCs but whose zlib stream is broken."""
    stream = bytearray(zlib.compress(bytes(range(256)) * 20))
    stream[10:24] = b"\xff" * 14
    return png_declaring(48, 32, bytes(stream))


def cmyk_jpeg() -> bytes:
    arr = np.zeros((32, 48, 4), np.uint8)
    arr[..., 0] = 255  # pure cyan
    return _save(Image.fromarray(arr, "CMYK"), "JPEG", quality=95)


def png_16bit() -> bytes:
    arr = np.empty((32, 32), np.uint16)
    arr[:16] = 65535
    arr[16:] = 128 * 257
    return _save(Image.fromarray(arr), "PNG")


def palette_transparency() -> bytes:
    im = Image.new("P", (48, 32), 0)
    im.putpalette([*RED, *GREEN] + [0] * (254 * 3))
    im.paste(1, (24, 0, 48, 32))
    return _save(im, "PNG", transparency=0)  # palette index 0 (left half) is transparent


def rgba_png() -> bytes:
    arr = np.zeros((32, 48, 4), np.uint8)
    arr[:, :24] = (*RED, 0)  # transparent red -> background
    arr[:, 24:] = (*BLUE, 255)
    return _save(Image.fromarray(arr, "RGBA"), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (48, 32), RED), Image.new("RGB", (48, 32), BLUE)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def grayscale_png() -> bytes:
    return _save(Image.new("L", (48, 32), 100), "PNG")


def exif_rotated_jpeg() -> bytes:
    """64x32 stored, left half red; EXIF orientation 6 -> shown 32x64, top half red."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(halves((64, 32)), "JPEG", quality=95, exif=exif.tobytes())


def webp() -> bytes:
    return _save(halves(), "WEBP", lossless=True)


def tiny_1x1() -> bytes:
    return _save(Image.new("RGB", (1, 1), RED), "PNG")


def bad_aspect() -> bytes:
    return _save(Image.new("RGB", (400, 16), RED), "PNG")


def random_bytes(n: int = 600, seed: int = 7) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# --- checks of decoded rows ---------------------------------------------------------------------
# ``pair`` is the decoded record (capgap.transforms.decode.decode_record) or a curated/ row:
# keys image (stored bytes), width, height, caption, decode_notes, columns; pixels optional.


def stored_image(pair: dict[str, Any]) -> Image.Image:
    im = Image.open(io.BytesIO(image_bytes(pair["image"])))  # bytes, or curated/'s struct
    im.load()
    return im


def _rgb(pair: dict[str, Any]) -> np.ndarray:
    """The stored image as an (H, W, 3) array (what curated/ hands to training)."""
    im = stored_image(pair)
    assert im.mode in ("RGB", "L"), f"stored image mode {im.mode}, expected RGB (or untouched L)"
    assert im.size == (pair["width"], pair["height"]), (im.size, pair["width"], pair["height"])
    arr = np.asarray(im.convert("RGB"), np.int32)
    if pair.get("pixels") is not None:
        pixels = np.asarray(pair["pixels"])
        assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3
    return arr


def _close(actual, expected, tol: int = 24) -> bool:
    return bool(np.all(np.abs(np.asarray(actual, np.int32) - np.asarray(expected)) <= tol))


def check_halves(left=RED, right=BLUE, tol: int = 24) -> Check:
    def check(pair: dict[str, Any]) -> None:
        arr = _rgb(pair)
        w = arr.shape[1]
        assert _close(arr[:, 2 : w // 2 - 2].mean((0, 1)), left, tol), arr[:, 0].mean(0)
        assert _close(arr[:, w // 2 + 2 : -2].mean((0, 1)), right, tol), arr[:, -1].mean(0)

    return check


def check_uniform(colour, tol: int = 24) -> Check:
    def check(pair: dict[str, Any]) -> None:
        arr = _rgb(pair)
        assert _close(arr.reshape(-1, 3).min(0), colour, tol), arr.reshape(-1, 3).min(0)
        assert _close(arr.reshape(-1, 3).max(0), colour, tol), arr.reshape(-1, 3).max(0)

    return check


def check_cmyk(pair: dict[str, Any]) -> None:
    assert stored_image(pair).mode == "RGB"
    check_uniform((0, 255, 255), tol=30)(pair)


def check_16bit(pair: dict[str, Any]) -> None:
    arr = _rgb(pair)
    assert stored_image(pair).mode == "RGB"
    assert _close(arr[:16], 255, 1), arr[:16].min()
    assert _close(arr[16:], 128, 1), (arr[16:].min(), arr[16:].max())


def check_palette(pair: dict[str, Any]) -> None:
    assert stored_image(pair).mode == "RGB"
    check_halves(WHITE, GREEN, tol=0)(pair)


def check_rgba(pair: dict[str, Any]) -> None:
    assert stored_image(pair).mode == "RGB"
    check_halves(WHITE, BLUE, tol=0)(pair)


def check_gif(pair: dict[str, Any]) -> None:
    assert "first_frame_of:2" in pair["decode_notes"], pair["decode_notes"]
    check_uniform(RED, tol=16)(pair)


def check_gray(pair: dict[str, Any]) -> None:
    arr = _rgb(pair)
    assert np.all(arr == 100), np.unique(arr)
    if pair.get("pixels") is not None:
        pixels = np.asarray(pair["pixels"])
        assert np.all(pixels == 100)


def check_exif(pair: dict[str, Any]) -> None:
    assert (pair["width"], pair["height"]) == (32, 64), (pair["width"], pair["height"])
    assert "exif_orientation:6" in pair["decode_notes"], pair["decode_notes"]
    arr = _rgb(pair)
    assert _close(arr[2:30].mean((0, 1)), RED, 24), arr[:32].mean((0, 1))
    assert _close(arr[34:-2].mean((0, 1)), BLUE, 24), arr[32:].mean((0, 1))
    orientation = stored_image(pair).getexif().get(0x0112, 1)
    assert orientation == 1, f"stored image still carries EXIF orientation {orientation}"


def check_webp(pair: dict[str, Any]) -> None:
    assert pair["image_format"] == "WEBP"
    check_halves(tol=0)(pair)


def check_caption(expected: str) -> Check:
    def check(pair: dict[str, Any]) -> None:
        assert pair["caption"] == expected, (pair["caption"], expected)

    return check


def check_nan(pair: dict[str, Any]) -> None:
    columns = pair.get("columns") or {}
    if "meta_json" in columns:
        value = json.loads(columns["meta_json"])["score"]
    else:
        value = columns.get("score", pair.get("score"))
    assert value is not None, columns
    assert math.isnan(float(value)), value


CONTROL_CAPTION = "a red\x00 cube\x07 on\x1b\tgrass\r\n"
INVISIBLE_CAPTION = "a\u200b red \u202ecube\ufeff on grass\u2066"
EMOJI_CAPTION = "a red cube 🟥 next to a family 👨‍👩‍👧 and a flag 🇫🇷"
LONG_CAPTION = "word " * 20_000  # 100k characters

# --- the kinds ----------------------------------------------------------------------------------

_kind("valid_png", "control: a plain RGB PNG and caption", check=check_halves())
_kind("valid_jpeg", "control: a plain RGB JPEG", check=check_halves())
_kind("truncated_jpeg", "JPEG cut at 60%")
_kind("truncated_png", "PNG cut at 60%")
_kind("corrupt_png", "PNG with valid CRCs but a broken zlib stream")
_kind("zero_bytes", "an image of 0 bytes")
_kind("random_bytes", "600 random bytes as the image")
_kind("image_null", "no image at all (null cell, no tar member, empty path cell)")
_kind("tiny_1x1", "a 1x1 image")
_kind("bad_aspect", "a 400x16 image")
_kind("bomb_png_ihdr", "decompression bomb: PNG IHDR declares 100000x100000")
_kind("bomb_png_8k", "PNG IHDR declares 8000x8000 (above max_pixels, below PIL's own bound)")
_kind("oversized_bytes", "a valid PNG padded above decode.max_bytes")
_kind("cmyk_jpeg", "CMYK JPEG (pure cyan)", check=check_cmyk)
_kind("png_16bit", "16-bit greyscale PNG", check=check_16bit)
_kind("palette_transparency", "palette PNG with a transparent index", check=check_palette)
_kind("rgba_png", "RGBA PNG, half transparent", check=check_rgba)
_kind("animated_gif", "two-frame animated GIF (red, then blue)", check=check_gif)
_kind("grayscale", "8-bit greyscale PNG", check=check_gray)
_kind("exif_rotated", "JPEG with EXIF orientation 6", check=check_exif)
_kind("webp", "lossless WebP", check=check_webp)
_kind("caption_none", "null caption / no .txt member", readers=BYTES_READERS)
_kind("caption_empty", "empty caption")
_kind("caption_whitespace", "caption of whitespace only")
_kind("caption_non_utf8", "caption bytes that are not UTF-8")
_kind("caption_100k", "a caption of 100k characters")
_kind(
    "caption_control_chars",
    "control characters in the caption",
    check=check_caption("a red cube on grass"),
)
_kind(
    "caption_invisible",
    "zero-width and bidi characters",
    check=check_caption("a red cube on grass"),
)
_kind("caption_emoji", "emoji, ZWJ sequences and flags", check=check_caption(EMOJI_CAPTION))
_kind("caption_wrong_type", "caption column of integers / JSON number", readers={"parquet", "hf"})
_kind("caption_json_number", "WebDataset caption as a JSON number", readers={"webdataset"})
_kind("missing_column", "a shard without a caption column", readers={"parquet", "hf", "csv"})
_kind("duplicate_uid", "two rows with one uid: the first is kept")
_kind("nan_numeric", "NaN in a numeric column", check=check_nan)
_kind("path_missing", "image path to a missing file", readers={"parquet", "csv"})
_kind("path_escape", "image path ../ escaping the image root", readers={"parquet", "csv"})
_kind("path_absolute", "absolute image path outside the root", readers={"parquet", "csv"})
_kind("path_symlink_escape", "symlink inside the root to a file outside", readers={"csv"})
_kind(
    "unreadable_shard",
    "a shard that is not the format at all",
    readers={"parquet", "webdataset", "csv"},
)
_kind(
    "parquet_bad_row_group", "a Parquet shard whose 2nd row group is corrupt", readers={"parquet"}
)
_kind("tar_truncated", "a tar shard cut inside a member", readers={"webdataset"})
_kind("tar_corrupt_header", "a tar member header with a bad checksum", readers={"webdataset"})
_kind("metadata_invalid", "a WebDataset .json member that is not JSON", readers={"webdataset"})
_kind("tar_two_images", "a tar key with two image members (.jpg and .png)", readers={"webdataset"})
_kind("path_non_utf8", "a CSV image path with non-UTF-8 bytes", readers={"csv"})
_kind("uid_non_utf8", "a CSV uid with non-UTF-8 bytes (kept, escaped)", readers={"csv"})
_kind("csv_gzip", "a valid gzip-compressed CSV shard (.csv.gz)", readers={"csv"})
_kind("csv_malformed_line", "a CSV line with too many fields", readers={"csv"})


def _main_rows() -> list[Row]:
    """The row-level kinds (one shard), in a fixed order."""
    png = valid_png()
    rows = [
        Row("valid_png", "valid_png", png, "a red and blue square", ok()),
        Row("valid_jpeg", "valid_jpeg", valid_jpeg(), "a red and blue square", ok(), ext="jpg"),
        Row(
            "truncated_jpeg",
            "truncated_jpeg",
            noise_jpeg()[: len(noise_jpeg()) * 6 // 10],
            "cut",
            err("image_truncated"),
            ext="jpg",
        ),
        Row(
            "truncated_png",
            "truncated_png",
            png[: len(png) * 6 // 10],
            "cut",
            err("image_truncated"),
        ),
        Row("corrupt_png", "corrupt_png", corrupt_png(), "broken", err("image_corrupt")),
        Row("zero_bytes", "zero_bytes", b"", "empty file", err("image_empty")),
        Row(
            "random_bytes",
            "random_bytes",
            random_bytes(),
            "noise",
            err("image_undecodable"),
            ext="jpg",
        ),
        Row("image_null", "image_null", None, "no image", err("image_missing")),
        Row("tiny_1x1", "tiny_1x1", tiny_1x1(), "a dot", err("image_too_small")),
        Row("bad_aspect", "bad_aspect", bad_aspect(), "a line", err("image_bad_aspect")),
        Row(
            "bomb_png_ihdr",
            "bomb_png_ihdr",
            png_declaring(100_000, 100_000),
            "bomb",
            err("image_too_large"),
        ),
        Row("bomb_png_8k", "bomb_png_8k", png_declaring(8000, 8000), "big", err("image_too_large")),
        Row(
            "oversized_bytes",
            "oversized_bytes",
            png + b"\0" * PADDING_BYTES,
            "padded",
            err("image_bytes_too_large"),
        ),
        Row("cmyk_jpeg", "cmyk_jpeg", cmyk_jpeg(), "a cyan square", ok(), ext="jpg"),
        Row("png_16bit", "png_16bit", png_16bit(), "white over grey", ok()),
        Row("palette_transparency", "palette_transparency", palette_transparency(), "green", ok()),
        Row("rgba_png", "rgba_png", rgba_png(), "blue", ok()),
        Row("animated_gif", "animated_gif", animated_gif(), "a red frame", ok(), ext="gif"),
        Row("grayscale", "grayscale", grayscale_png(), "grey", ok()),
        Row("exif_rotated", "exif_rotated", exif_rotated_jpeg(), "red over blue", ok(), ext="jpg"),
        Row("webp", "webp", webp(), "a red and blue square", ok(), ext="webp"),
        Row("caption_none", "caption_none", png, None, err("caption_missing"), txt=False),
        Row("caption_empty", "caption_empty", png, "", err("caption_empty")),
        Row("caption_whitespace", "caption_whitespace", png, " \t\n \u3000 ", err("caption_empty")),
        Row("caption_100k", "caption_100k", png, LONG_CAPTION, err("caption_too_long")),
        Row("caption_control_chars", "caption_control_chars", png, CONTROL_CAPTION, ok()),
        Row("caption_invisible", "caption_invisible", png, INVISIBLE_CAPTION, ok()),
        Row("caption_emoji", "caption_emoji", png, EMOJI_CAPTION, ok()),
        Row("duplicate_uid", "dup-uid", png, "the first of two", ok()),
        Row("nan_numeric", "nan_numeric", png, "a red and blue square", ok(), score=float("nan")),
        Row("duplicate_uid", "dup-uid", png, "the second of two", err("duplicate_uid")),
    ]
    return rows


NON_UTF8 = b"a caf\xe9 \xff\xfe sign"  # latin-1, not UTF-8


# --- writers -----------------------------------------------------------------------------------


@dataclass
class Corpus:
    """The inputs written for one reader and what must happen to each row."""

    reader: str
    root: Path
    patterns: list[str]
    cases: list[Case] = field(default_factory=list)
    read_overrides: dict[str, Any] = field(default_factory=dict)

    def kinds(self) -> list[str]:
        return sorted({c.kind for c in self.cases})

    def cases_of(self, kind: str) -> list[Case]:
        return [c for c in self.cases if c.kind == kind]

    def by_ref(self) -> dict[tuple[str, int], Case]:
        return {(c.source, c.index): c for c in self.cases}

    def read_config(self):
        from capgap.transforms.readers import ReadConfig

        return ReadConfig(**self.read_overrides)

    def plans(self) -> list:
        from capgap.transforms.readers import discover

        return [discover(self.read_config(), p) for p in self.patterns]


def _parquet_table(rows: list[Row], caption_type: pa.DataType = pa.string()) -> pa.Table:
    return pa.table(
        {
            "uid": pa.array([r.uid for r in rows], pa.string()),
            "image": pa.array([r.image for r in rows], pa.binary()),
            "caption": pa.array([r.caption for r in rows], caption_type),
            "score": pa.array([r.score for r in rows], pa.float64()),
        }
    )


def _caption_ok_in_text_column(row: Row) -> bool:
    return row.caption is None or isinstance(row.caption, str)


def _write_outside(root: Path) -> Path:
    """A valid image outside every image root (what escaping paths point at)."""
    outside = root / "outside"
    outside.mkdir(parents=True, exist_ok=True)
    target = outside / "secret.png"
    target.write_bytes(valid_png())
    return target


def _build_parquet(root: Path) -> Corpus:
    folder = root / "parquet"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    corpus = Corpus("parquet", root, [str(folder / "*.parquet")])
    rows = _main_rows()
    pq.write_table(_parquet_table(rows), folder / "main.parquet")
    corpus.cases += [Case(r.kind, "main.parquet", i, r.expected, r.uid) for i, r in enumerate(rows)]

    png = valid_png()
    pq.write_table(
        _parquet_table(
            [
                Row("caption_non_utf8", "non_utf8", png, NON_UTF8, err("caption_not_utf8")),
                Row("valid_png", "binary_caption_ok", png, b"plain text as bytes", ok()),
            ],
            pa.binary(),
        ),
        folder / "binary_caption.parquet",
    )
    corpus.cases += [
        Case("caption_non_utf8", "binary_caption.parquet", 0, err("caption_not_utf8")),
        Case("valid_png", "binary_caption.parquet", 1, ok()),
    ]

    pq.write_table(
        pa.table({"uid": ["nocap-0", "nocap-1"], "image": [png, png], "score": [0.1, 0.2]}),
        folder / "no_caption.parquet",
    )
    corpus.cases += [
        Case("missing_column", "no_caption.parquet", i, err("column_missing")) for i in range(2)
    ]

    pq.write_table(
        pa.table(
            {"uid": ["wt-0", "wt-1"], "image": [png, png], "caption": [1, 2], "score": [0.1, 0.2]}
        ),
        folder / "wrong_type.parquet",
    )
    corpus.cases += [
        Case("caption_wrong_type", "wrong_type.parquet", i, err("column_type_invalid"))
        for i in range(2)
    ]

    # Image paths: the image column holds text, resolved against the shard's folder.
    (folder / "images" / "ok.png").write_bytes(png)
    target = _write_outside(root)
    path_rows = [
        ("valid_png", "images/ok.png", ok()),
        ("path_missing", "images/nope.png", err("path_missing")),
        ("path_escape", f"../{target.parent.name}/{target.name}", err("path_outside_root")),
        ("path_absolute", str(target), err("path_outside_root")),
    ]
    pq.write_table(
        pa.table(
            {
                "uid": [f"path-{i}" for i in range(len(path_rows))],
                "image": [p for _, p, _ in path_rows],
                "caption": ["a red and blue square"] * len(path_rows),
                "score": [0.5] * len(path_rows),
            }
        ),
        folder / "paths.parquet",
    )
    corpus.cases += [
        Case(kind, "paths.parquet", i, expected) for i, (kind, _, expected) in enumerate(path_rows)
    ]

    (folder / "unreadable.parquet").write_bytes(b"PAR1" + random_bytes(2000, seed=3))
    corpus.cases.append(Case("unreadable_shard", "unreadable.parquet", -1, err("shard_unreadable")))

    table = _parquet_table(
        [
            Row("parquet_bad_row_group", "rg-0", png, "group one", ok()),
            Row("parquet_bad_row_group", "rg-1", png, "group two", ok()),
        ]
    )
    path = folder / "row_groups.parquet"
    pq.write_table(table, path, row_group_size=1, compression="snappy")
    column = pq.ParquetFile(path).metadata.row_group(1).column(1)
    offset = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 12] = b"\xff" * 12  # the page header of group 2's image column
    path.write_bytes(bytes(data))
    corpus.cases += [
        Case("parquet_bad_row_group", "row_groups.parquet", 0, ok()),
        Case("parquet_bad_row_group", "row_groups.parquet", 1, err("record_unreadable")),
    ]
    return corpus


def _build_hf(root: Path) -> Corpus:
    import datasets

    folder = root / "hf"
    folder.mkdir(parents=True, exist_ok=True)
    png = valid_png()

    def save(name: str, rows: list[Row], caption_feature, with_caption: bool = True) -> None:
        features = {
            "uid": datasets.Value("string"),
            "image": datasets.Image(decode=False),
            "score": datasets.Value("float64"),
        }
        data: dict[str, list] = {
            "uid": [r.uid for r in rows],
            "image": [None if r.image is None else {"bytes": r.image, "path": None} for r in rows],
            "score": [r.score for r in rows],
        }
        if with_caption:
            features["caption"] = caption_feature
            data["caption"] = [r.caption for r in rows]
        ds = datasets.Dataset.from_dict(data, features=datasets.Features(features))
        ds.save_to_disk(str(folder / name))

    corpus = Corpus("hf", root, [])
    rows = _main_rows()
    save("main", rows, datasets.Value("string"))
    corpus.cases += [Case(r.kind, "main", i, r.expected, r.uid) for i, r in enumerate(rows)]
    save(
        "binary_caption",
        [
            Row("caption_non_utf8", "hf-non-utf8", png, NON_UTF8, err("caption_not_utf8")),
            Row("valid_png", "hf-binary-ok", png, b"plain text as bytes", ok()),
        ],
        datasets.Value("binary"),
    )
    corpus.cases += [
        Case("caption_non_utf8", "binary_caption", 0, err("caption_not_utf8")),
        Case("valid_png", "binary_caption", 1, ok()),
    ]
    save(
        "no_caption",
        [Row("missing_column", f"hf-nocap-{i}", png, None, ok()) for i in range(2)],
        None,
        with_caption=False,
    )
    corpus.cases += [
        Case("missing_column", "no_caption", i, err("column_missing")) for i in range(2)
    ]
    save(
        "wrong_type",
        [Row("caption_wrong_type", f"hf-wt-{i}", png, i, ok()) for i in range(2)],
        datasets.Value("int64"),
    )
    corpus.cases += [
        Case("caption_wrong_type", "wrong_type", i, err("column_type_invalid")) for i in range(2)
    ]
    corpus.patterns = [
        str(folder / name) for name in ("main", "binary_caption", "no_caption", "wrong_type")
    ]
    return corpus


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """A USTAR archive of ``(name, data)`` members (fixed mtime: reproducible)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _sample_members(key: str, row: Row) -> list[tuple[str, bytes]]:
    members = []
    if row.image is not None:
        members.append((f"{key}.{row.ext}", row.image))
    if row.txt and row.caption is not None:
        text = row.caption if isinstance(row.caption, bytes) else str(row.caption).encode("utf-8")
        members.append((f"{key}.txt", text))
    meta: dict[str, Any] = {"uid": row.uid, "score": row.score}
    if not row.txt and row.caption is not None:
        meta["caption"] = row.caption
    members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))  # NaN -> NaN (json allows)
    return members


def _build_webdataset(root: Path) -> Corpus:
    folder = root / "wds"
    folder.mkdir(parents=True, exist_ok=True)
    corpus = Corpus("webdataset", root, [str(folder / "*.tar")])
    png = valid_png()
    rows = _main_rows()
    rows += [
        Row("caption_non_utf8", "wds-non-utf8", png, NON_UTF8, err("caption_not_utf8")),
        Row(
            "caption_json_number",
            "wds-json-number",
            png,
            12345,
            err("caption_type_invalid"),
            txt=False,
        ),
    ]
    members: list[tuple[str, bytes]] = []
    for i, row in enumerate(rows):
        members += _sample_members(f"{i:05d}", row)
    # metadata_invalid: the .json member is not JSON (uid falls back to the key).
    members += [("99999.png", png), ("99999.txt", b"a caption"), ("99999.json", b"{not json")]
    # tar_two_images: which image the caption describes is unknown.
    members += [("99999a.jpg", valid_jpeg()), ("99999a.png", png), ("99999a.txt", b"which")]
    (folder / "main-000.tar").write_bytes(tar_bytes(members))
    corpus.cases += [Case(r.kind, "main-000.tar", i, r.expected, r.uid) for i, r in enumerate(rows)]
    corpus.cases.append(
        Case("metadata_invalid", "main-000.tar", len(rows), err("metadata_invalid"))
    )
    corpus.cases.append(
        Case("tar_two_images", "main-000.tar", len(rows) + 1, err("record_malformed"))
    )

    def three(prefix: str) -> bytes:
        rows = [Row("x", f"{prefix}-{i}", png, f"sample {i}", ok()) for i in range(3)]
        return tar_bytes([m for i, r in enumerate(rows) for m in _sample_members(f"k{i}", r)])

    # Truncated: cut inside the second sample's image data.
    good = three("trunc")
    cut = good.find(b"k1.png")
    (folder / "truncated.tar").write_bytes(good[: cut + 512 + 20])
    corpus.cases += [
        Case("tar_truncated", "truncated.tar", 0, ok()),
        Case("tar_truncated", "truncated.tar", 1, err("record_unreadable")),
        Case("tar_truncated", "truncated.tar", 2, err("shard_truncated")),
    ]
    # Corrupt header: the second sample's first member header has a bad checksum.
    data = bytearray(three("corrupt"))
    header = data.find(b"k1.png")
    data[header + 148 : header + 156] = b"0000000\0"
    (folder / "corrupt_header.tar").write_bytes(bytes(data))
    corpus.cases += [
        Case("tar_corrupt_header", "corrupt_header.tar", 0, ok()),
        # The rest of the shard cannot be read: it must be reported, not silently skipped.
        Case(
            "tar_corrupt_header",
            "corrupt_header.tar",
            1,
            err("shard_truncated", "record_unreadable"),
        ),
    ]
    (folder / "unreadable.tar").write_bytes(b"this is not a tar archive\n" * 40)
    corpus.cases.append(Case("unreadable_shard", "unreadable.tar", -1, err("shard_unreadable")))
    return corpus


def _csv_text(header: list[str], rows: list[list[str]], delimiter: str = ",") -> bytes:
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode("utf-8", errors="surrogateescape")


def _build_csv(root: Path) -> Corpus:
    folder = root / "csv"
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    corpus = Corpus("csv", root, [str(folder / "*.csv*")])
    target = _write_outside(root)
    os.symlink(target, images / "link.png")
    png = valid_png()
    rows = [r for r in _main_rows() if r.kind != "caption_none"]
    lines: list[list[str]] = []
    for i, row in enumerate(rows):
        name = ""
        if row.image is not None:
            name = f"images/{i:03d}_{row.kind}.{row.ext}"
            (folder / name).write_bytes(row.image)
        caption = row.caption
        if isinstance(caption, bytes):
            caption = caption.decode("utf-8", errors="surrogateescape")
        score = "nan" if math.isnan(row.score) else str(row.score)
        lines.append([row.uid, name, caption, score])
    corpus.cases += [Case(r.kind, "data.csv", i, r.expected, r.uid) for i, r in enumerate(rows)]
    extra = [
        ("path_missing", ["csv-missing", "images/nope.png", "gone", "0.5"], err("path_missing")),
        (
            "path_escape",
            ["csv-escape", f"../{target.parent.name}/{target.name}", "out", "0.5"],
            err("path_outside_root"),
        ),
        ("path_absolute", ["csv-abs", str(target), "out", "0.5"], err("path_outside_root")),
        (
            "path_symlink_escape",
            ["csv-link", "images/link.png", "out", "0.5"],
            err("path_outside_root"),
        ),
        (
            "csv_malformed_line",
            ["csv-malformed", "images/000_valid_png.png", "a caption", "0.5", "surplus"],
            err("record_malformed"),
        ),
    ]
    for kind, line, expected in extra:
        corpus.cases.append(Case(kind, "data.csv", len(lines), expected, line[0]))
        lines.append(line)
    header = ["uid", "image_path", "caption", "score"]
    (folder / "data.csv").write_bytes(_csv_text(header, lines))

    (folder / "no_caption.csv").write_bytes(
        _csv_text(
            ["uid", "image_path", "score"], [["csv-nocap-0", "images/000_valid_png.png", "1"]]
        )
    )
    corpus.cases.append(Case("missing_column", "no_caption.csv", 0, err("column_missing")))
    # Gzip-compressed CSV (a format guess_format accepts): one valid shard, one broken one.
    gz = root / "csv_gz"
    gz.mkdir(parents=True, exist_ok=True)
    (gz / "ok.png").write_bytes(png)
    valid = _csv_text(header, [["gz-0", "ok.png", "a red and blue square", "0.5"]])
    (gz / "valid.csv.gz").write_bytes(gzip.compress(valid, mtime=0))
    (gz / "broken.csv.gz").write_bytes(b"\x1f\x8b\x08\x00" + random_bytes(300, seed=5))
    corpus.patterns.append(str(gz / "*.csv.gz"))
    corpus.cases += [
        Case("csv_gzip", "valid.csv.gz", 0, ok(), "gz-0", pattern=1),
        Case("unreadable_shard", "broken.csv.gz", -1, err("shard_unreadable"), pattern=1),
    ]
    # Non-UTF-8 bytes in a caption cell, next to a valid row of the same shard.
    latin = root / "csv_latin1"
    latin.mkdir(parents=True, exist_ok=True)
    (latin / "ok.png").write_bytes(png)
    caption = NON_UTF8.decode("utf-8", errors="surrogateescape")
    (latin / "caf\u00e9.png").write_bytes(png)
    latin_path = "caf\xe9.png".encode("latin-1").decode("utf-8", errors="surrogateescape")
    latin_uid = "uid-\xe9".encode("latin-1").decode("utf-8", errors="surrogateescape")
    lines = [
        ["l1-0", "ok.png", "a red and blue square", "0.5"],
        ["l1-1", "ok.png", caption, "0.5"],
        ["l1-2", latin_path, "a red and blue square", "0.5"],
        [latin_uid, "ok.png", "a red and blue square", "0.5"],
    ]
    (latin / "latin1.csv").write_bytes(_csv_text(header, lines))
    corpus.patterns.append(str(latin / "*.csv"))
    corpus.cases += [
        Case("caption_non_utf8", "latin1.csv", 0, ok(), "l1-0", pattern=2),
        Case("caption_non_utf8", "latin1.csv", 1, err("caption_not_utf8"), "l1-1", pattern=2),
        Case("path_non_utf8", "latin1.csv", 2, err("path_invalid"), pattern=2),
        Case("uid_non_utf8", "latin1.csv", 3, ok(), pattern=2),
    ]
    return corpus


BUILDERS = {
    "parquet": _build_parquet,
    "hf": _build_hf,
    "webdataset": _build_webdataset,
    "csv": _build_csv,
}


def build(reader: str, root: str | os.PathLike) -> Corpus:
    """Write the corpus for ``reader`` under ``root`` (a fresh folder)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus = BUILDERS[reader](root)
    missing = set(kinds_for(reader)) - set(corpus.kinds())
    unknown = set(corpus.kinds()) - set(KINDS)
    if missing or unknown:
        raise AssertionError(f"{reader}: kinds not generated {missing}, unknown {unknown}")
    return corpus


def decode_config():
    from capgap.transforms.decode import DecodeConfig

    return DecodeConfig(**DECODE_OVERRIDES)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__)
        return 2
    for reader in READERS:
        corpus = build(reader, Path(argv[0]) / reader)
        print(f"{reader}: {len(corpus.kinds())} kinds, {len(corpus.cases)} rows, {corpus.patterns}")
        for case in corpus.cases:
            print(f"  {case.kind:<24} {case.source}#{case.index}: {case.expected}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


# --- running the readers and decoding over a corpus (no model) ----------------------------------


@dataclass
class DecodeRun:
    """What ReadRecords -> DropDuplicateUids -> DecodeRecords made of a corpus."""

    ok: list[dict[str, Any]]  # decoded pairs (pixels included)
    errors: list[dict[str, Any]]  # errors/ rows
    rows_in: int  # the readers' rows_in counter
    driver_errors: dict[int, str] = field(default_factory=dict)  # pattern -> discover() crash

    def landed(self) -> dict[tuple[str, int], list[tuple[str, str, dict[str, Any]]]]:
        """(source, index) -> [(outcome, reason, row)] for every output row."""
        out: dict[tuple[str, int], list] = {}
        for pair in self.ok:
            ref = (pair["source"], pair["source_index"])
            out.setdefault(ref, []).append((CURATED, "passed", pair))
        for row in self.errors:
            ref = (row["source"], row["source_index"])
            out.setdefault(ref, []).append((ERRORS, row["reason"], row))
        return out


def _encode(tag: str):
    def encode(element: Any) -> str:
        import base64
        import pickle

        value = element[1] if tag == "ok" else element
        return base64.b64encode(pickle.dumps((tag, value))).decode("ascii")

    return encode


def run_read_decode(corpus: Corpus, out_dir: str | os.PathLike, pipeline=None) -> DecodeRun:
    """Run the readers, dedup and decoding over ``corpus`` under ``pipeline`` (a TestPipeline
    by default); collect every output row through a text file. When the pipeline crashes,
    each input pattern is run on its own so the crash is pinned on the inputs that cause it
    (``driver_errors``) and the other inputs are still checked."""
    out = Path(out_dir)
    groups = list(range(len(corpus.patterns)))
    try:
        return _run_groups(corpus, groups, out / "all", pipeline)
    except Exception as error:  # a crash of the whole pipeline: find which input caused it
        if len(groups) == 1:
            return DecodeRun([], [], 0, {0: f"pipeline crashed: {type(error).__name__}: {error}"})
    runs = []
    for group in groups:
        try:
            runs.append(_run_groups(corpus, [group], out / f"group{group}", None))
        except Exception as error:
            message = f"pipeline crashed: {type(error).__name__}: {str(error)[:500]}"
            runs.append(DecodeRun([], [], 0, {group: message}))
    return DecodeRun(
        [r for run in runs for r in run.ok],
        [r for run in runs for r in run.errors],
        sum(run.rows_in for run in runs),
        {k: v for run in runs for k, v in run.driver_errors.items()},
    )


def _run_groups(corpus: Corpus, groups: list[int], out: Path, pipeline) -> DecodeRun:
    import base64
    import pickle

    import apache_beam as beam
    from apache_beam.metrics.metric import MetricsFilter
    from apache_beam.testing.test_pipeline import TestPipeline

    from capgap.transforms.captions import CaptionConfig
    from capgap.transforms.decode import DecodeRecords
    from capgap.transforms.dedup import DropDuplicateUids
    from capgap.transforms.readers import ReadRecords, discover

    out.mkdir(parents=True, exist_ok=True)
    p = pipeline if pipeline is not None else TestPipeline()
    reads, driver_errors = [], {}
    for i in groups:
        pattern = corpus.patterns[i]
        try:
            plan = discover(corpus.read_config(), pattern)
        except Exception as error:  # a crash of the driver: reported per case by the tests
            driver_errors[i] = f"discover({pattern!r}) raised {type(error).__name__}: {error}"
            continue
        reads.append(p | f"Read{i}" >> ReadRecords(plan))
    if not reads:
        return DecodeRun([], [], 0, driver_errors)
    records = reads | "AllInputs" >> beam.Flatten()
    dedup = records | "Dedup" >> DropDuplicateUids()
    decoded = dedup.ok | "Decode" >> DecodeRecords(decode_config(), CaptionConfig())
    (
        (
            decoded.ok | "EncodeOk" >> beam.Map(_encode("ok")),
            decoded.errors | "EncodeErrors" >> beam.Map(_encode("errors")),
            dedup.errors | "EncodeDup" >> beam.Map(_encode("errors")),
        )
        | "AllOutputs" >> beam.Flatten()
        | "Write" >> beam.io.WriteToText(str(out / "rows"), shard_name_template="")
    )
    result = p.run()
    result.wait_until_finish()
    counters = result.metrics().query(MetricsFilter().with_name("rows_in"))["counters"]
    rows_in = sum(c.committed if c.committed is not None else c.attempted for c in counters)
    ok_rows, error_rows = [], []
    text = (out / "rows").read_text(encoding="ascii")
    for line in text.splitlines():
        tag, value = pickle.loads(base64.b64decode(line))
        (ok_rows if tag == "ok" else error_rows).append(value)
    return DecodeRun(ok_rows, error_rows, rows_in, driver_errors)


# --- `capgap curate` over a corpus (tiny random-init CLIP, never a download) ---------------------

#: The policy of curate runs over the corpus: a quantile drop rule (so rejected/ is used) and
#: a quantile recaption rule, both over the run's own score histograms.
CURATE_OVERRIDES = (
    'decide.drop.mode="quantile"',
    "decide.drop.value=0.2",
    'decide.recaption.mode="quantile"',
    "decide.recaption.value=0.5",
    f"decode.max_bytes={DECODE_OVERRIDES['max_bytes']}",
    "score.bank_size=8",
    "model.name=capgap-micro-vit",
    "model.seed=0",
    "model.min_batch_size=2",
    "model.max_batch_size=8",
    "model.torch_threads=1",
    "num_shards=2",
)


def curate_argv(pattern: str, output: str | os.PathLike, *extra: str) -> list[str]:
    """``capgap curate`` arguments for one input pattern (Beam options go in ``extra``)."""
    argv = ["--input", pattern, "--output", str(output)]
    for override in CURATE_OVERRIDES:
        argv += ["--set", override]
    return argv + list(extra)


def curated_ok() -> Expected:
    """A valid row after the policy: curated, or rejected by the (random-model) policy."""
    return Expected(CURATED, ("passed", "high_imbalance", "low_certainty"))


@dataclass
class BuildOutput:
    """The files of a finished (or killed) ``capgap curate`` output prefix."""

    root: Path
    manifest: dict[str, Any] | None
    files: dict[str, list[str]]  # folder -> sorted part file names
    rows: dict[str, list[dict[str, Any]]]  # folder -> rows of all its part files
    stray: list[str]  # anything else under the prefix (temp dirs, partial files)
    metrics: dict[str, int] = field(default_factory=dict)  # Beam counters, when run in-process
    placement: dict[tuple, str] = field(
        default_factory=dict
    )  # (folder, uid, source, index) -> file

    def landed(self) -> dict[tuple[str, int], list[tuple[str, str, dict[str, Any]]]]:
        out: dict[tuple[str, int], list] = {}
        for folder, rows in self.rows.items():
            for row in rows:
                out.setdefault((row["source"], row["source_index"]), []).append(
                    (folder, row["reason"], row)
                )
        return out


def read_build(output: str | os.PathLike) -> BuildOutput:
    root = Path(output)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else None
    files: dict[str, list[str]] = {}
    rows: dict[str, list[dict[str, Any]]] = {}
    stray: list[str] = []
    placement: dict[tuple, str] = {}
    for entry in sorted(root.rglob("*")):
        rel = entry.relative_to(root).as_posix()
        if (
            rel == "manifest.json"
            or rel == "README.md"  # the dataset card
            or rel == "config.yaml"
            or entry.is_dir()
            and rel
            in (
                CURATED,
                REJECTED,
                ERRORS,
            )
        ):
            continue
        folder, _, name = rel.partition("/")
        is_part = name.startswith("part-") and name.endswith(".parquet") and "/" not in name
        if folder in (CURATED, REJECTED, ERRORS) and is_part and entry.is_file():
            files.setdefault(folder, []).append(name)
            part = pq.read_table(entry).to_pylist()
            rows.setdefault(folder, []).extend(part)
            for row in part:
                placement[(folder, row["uid"], row["source"], row["source_index"])] = name
            continue
        stray.append(rel)
    return BuildOutput(root, manifest, files, rows, stray, placement=placement)


def reference_build(
    tmp_root: str | os.PathLike, reader: str = "parquet"
) -> tuple[Corpus, BuildOutput]:
    """One in-process ``capgap curate`` run (DirectRunner in_memory) over ``reader``'s corpus,
    made once per process and per ``tmp_root`` and shared by the test modules."""
    key = (str(tmp_root), reader)
    if key not in _REFERENCE_BUILDS:
        from capgap.pipeline import curate

        root = Path(tmp_root) / f"curate_reference_{reader}"
        corpus = build(reader, root / "input")
        output = root / "output"
        manifest = curate.run(
            curate_argv(corpus.patterns[0], output, "--direct_running_mode=in_memory")
        )
        built = read_build(output)
        built.metrics = manifest.get("metrics", {})
        _REFERENCE_BUILDS[key] = (corpus, built)
    return _REFERENCE_BUILDS[key]


#: Scores may differ by this much between runners (different batches through the model).
FLOAT_TOLERANCE = 1e-5


def rows_by_key(built: BuildOutput) -> dict[tuple[str, str], dict]:
    out = {}
    for folder, rows in built.rows.items():
        for row in rows:
            key = (folder, row["uid"], row["source"], row["source_index"])
            assert key not in out, f"row twice: {key}"
            out[key] = row
    return out


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= FLOAT_TOLERANCE
    return a == b


def build_differences(a: BuildOutput, b: BuildOutput, skip=frozenset()) -> list[str]:
    """Rows (matched by folder, uid, source, index) that differ between two builds."""
    rows_a, rows_b = rows_by_key(a), rows_by_key(b)
    problems = [f"only in the first run: {k}" for k in sorted(set(rows_a) - set(rows_b))]
    problems += [f"only in the second run: {k}" for k in sorted(set(rows_b) - set(rows_a))]
    for key in sorted(set(rows_a) & set(rows_b)):
        ra, rb = rows_a[key], rows_b[key]
        if set(ra) != set(rb):
            problems.append(f"{key}: columns differ {set(ra) ^ set(rb)}")
        for column in sorted(set(ra) & set(rb) - set(skip)):
            if not _same_value(ra[column], rb[column]):
                problems.append(f"{key} {column}: {ra[column]!r:.80} != {rb[column]!r:.80}")
    return problems


_REFERENCE_BUILDS: dict[tuple[str, str], tuple[Corpus, BuildOutput]] = {}
