"""Decode and validate each record on its own, before batching; dead-letter the failures.

:class:`DecodeRecords` takes the readers' ``(uid, record)`` pairs and returns two
PCollections: ``ok`` with ``(uid, pair)`` ready for the CLIP handler, ``errors`` with
one ``errors/`` row per failed record (reason codes from
:mod:`capgap.transforms.reasons`). Decoding happens one record at a time because
RunInference dead-letters whole batches: a bad image must never reach a batch.

Images: size and pixel bounds (decompression bombs, ``Image.DecompressionBombError``
and ``...Warning`` included), full decode to catch truncation, first frame of an
animation (recorded), EXIF orientation applied, every PIL mode mapped to RGB
(palette and alpha composited over ``decode.alpha_background``, 16-bit and float
scaled, CMYK, 1-bit, ...). A blank image is never substituted. The image written to
``curated/`` is the original bytes when nothing changed, else a re-encoding chosen by
:func:`stored_encoding` that keeps the source's kind of compression: a JPEG stays a JPEG
(only EXIF-rotated: re-encoded with the source's own quantisation tables and chroma
subsampling, about the source's size), a WebP stays a WebP (lossless if it was), anything
else becomes a PNG. ``image_format`` always names the stored bytes' format;
``decode_notes`` records what was done (``reencoded_jpeg``, ``from:TIFF``, ...).

Captions are normalised by :mod:`capgap.transforms.captions`.

    python -m capgap.transforms.decode IMAGE_FILE   # decode one file, print the result
"""

from __future__ import annotations

import contextlib
import io
import os
import posixpath
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from PIL import Image, ImageOps, JpegImagePlugin, TiffImagePlugin, UnidentifiedImageError

from capgap.transforms.captions import CaptionConfig, normalise_caption
from capgap.transforms.reasons import Reason, RecordError, Stage, error_row, exception_message
from capgap.transforms.schema import ERRORS


@dataclass
class DecodeConfig:
    """Bounds on images; see the module docstring."""

    max_bytes: int = 50 * 1024 * 1024  # encoded size
    max_pixels: int = 40_000_000  # width * height; decompression-bomb bound
    min_side: int = 16  # shorter side, after EXIF rotation
    max_aspect_ratio: float = 10.0  # longer side / shorter side
    # The shorter side of the copy handed to the model (the stored image keeps its size).
    # None: the scoring model's own input side, which `capgap curate` fills in from the
    # model's config (models/clip_handler.py model_input_side); a decode that runs with
    # it still None keeps the full size, as 0 does.
    model_max_side: int | None = None
    alpha_background: list[int] = field(default_factory=lambda: [255, 255, 255])
    keep_original_bytes: bool = True  # write untouched RGB/L JPEG/PNG/WebP as they came
    # Decode large JPEGs at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the model's
    # image is at most half the source's size; see draft_jpeg.
    jpeg_draft: bool = True

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or self.max_pixels < 1 or self.min_side < 1:
            raise ValueError("decode.max_bytes, max_pixels, min_side must be >= 1")
        if self.max_aspect_ratio < 1.0:
            raise ValueError("decode.max_aspect_ratio must be >= 1")
        if self.model_max_side is not None and self.model_max_side < 0:
            raise ValueError("decode.model_max_side must be >= 0 (0: never downscale)")
        if len(self.alpha_background) != 3 or not all(0 <= v <= 255 for v in self.alpha_background):
            raise ValueError("decode.alpha_background must be three values in 0..255")


# --- images ----------------------------------------------------------------------------------


@dataclass
class DecodedImage:
    pixels: np.ndarray  # (H, W, 3) uint8, downscaled to model_max_side
    data: bytes  # what curated/ stores
    format: str  # the format of ``data`` (PIL's name: JPEG, PNG, WEBP)
    width: int  # after EXIF rotation
    height: int
    notes: list[str]


_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


def _high_depth_to_l(im: Image.Image, fmt: str | None = None) -> Image.Image:
    """16-bit / 32-bit / float greyscale -> 8-bit.

    A known 16-bit depth (``I;16*`` modes, or ``I`` from a PNG, whose depth is at most
    16 bits) is scaled by 255/65535 whatever values it uses (a dark image stays dark);
    other integer and float images by the value range they use.
    """
    arr = np.asarray(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and fmt == "PNG"):
        scaled = arr.astype(np.float64) / 257.0
    elif arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        hi = float(arr.max()) if arr.size else 0.0
        lo = float(arr.min()) if arr.size else 0.0
        if lo >= 0.0 and hi <= 1.0:
            scaled = arr * 255.0
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    else:
        arr = arr.astype(np.int64)
        hi = int(arr.max()) if arr.size else 0
        lo = int(arr.min()) if arr.size else 0
        if lo >= 0 and hi <= 255:
            scaled = arr
        elif lo >= 0 and hi <= 65535:
            scaled = arr / 257.0
        else:
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def to_rgb(
    im: Image.Image, background: tuple[int, int, int], fmt: str | None = None
) -> tuple[Image.Image, str | None]:
    """Any PIL mode -> RGB; returns (image, note or None when it was RGB already)."""
    mode = im.mode
    if mode == "RGB":
        return im, None
    try:
        if mode == "P" and "transparency" in im.info or mode == "PA" or mode in _ALPHA_MODES:
            rgba = im.convert("RGBA")
        else:
            rgba = None
        if rgba is not None:
            canvas = Image.new("RGB", rgba.size, background)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas, f"mode:{mode}->RGB(alpha over {background})"
        if mode.startswith("I") or mode == "F":
            return _high_depth_to_l(im, fmt).convert("RGB"), f"mode:{mode}->RGB"
        return im.convert("RGB"), f"mode:{mode}->RGB"
    except (ValueError, OSError) as err:
        raise RecordError(
            Reason.IMAGE_MODE_UNSUPPORTED, f"cannot map mode {mode} to RGB: {err}"
        ) from err


def _pil_error(reason: Reason, err: BaseException) -> RecordError:
    return RecordError(reason, exception_message(err), type(err).__name__)


def _classify_load_error(err: BaseException) -> Reason:
    text = str(err).lower()
    if isinstance(err, EOFError) or "truncated" in text or "end of file" in text:
        return Reason.IMAGE_TRUNCATED
    return Reason.IMAGE_CORRUPT


# Where PIL's getexif() finds an orientation: these ``info`` keys (EXIF blocks, PNG's raw
# profile, XMP) or a TIFF's own tags.
_ORIENTATION_SOURCES = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def exif_orientation(im: Image.Image) -> int:
    """The EXIF / XMP orientation tag (1: none). Images without any metadata that could hold
    one skip ``getexif()``, which costs about a third of decoding a small PNG."""
    if not isinstance(im, TiffImagePlugin.TiffImageFile) and not any(
        key in im.info for key in _ORIENTATION_SOURCES
    ):
        return 1
    return int(im.getexif().get(0x0112, 1) or 1)


#: Quality of a JPEG / lossy WebP re-encoded without usable source tables (CMYK JPEGs, ...).
REENCODE_QUALITY = 95


def _webp_lossless(data: bytes) -> bool:
    """Whether a WebP file's image is lossless (a ``VP8L`` chunk, not ``VP8 ``)."""
    return b"VP8L" in data[12:4096] and b"VP8 " not in data[12:4096]


@dataclass(frozen=True)
class JpegTables:
    """What a JPEG re-encode needs of its source: quantisation tables and chroma subsampling
    (PIL's ``get_sampling``: 0 4:4:4, 1 4:2:2, 2 4:2:0, -1 unknown)."""

    qtables: dict[int, list[int]]
    subsampling: int

    @classmethod
    def of(cls, im: Image.Image) -> JpegTables | None:
        if not isinstance(im, JpegImagePlugin.JpegImageFile) or not im.quantization:
            return None
        return cls(dict(im.quantization), JpegImagePlugin.get_sampling(im))


def stored_encoding(
    source: Image.Image,
    normalised: Image.Image,
    fmt: str,
    data: bytes,
    tables: JpegTables | None = None,
) -> tuple[bytes, str]:
    """Encode the image ``curated/`` stores when the source bytes cannot be kept: returns
    (bytes, PIL format name).

    ``source`` is the decoded source image after EXIF orientation (its own mode),
    ``normalised`` its RGB version, ``tables`` the source JPEG's (:class:`JpegTables`). A
    JPEG (or MPO: a phone's multi-picture JPEG, first frame) whose pixels only moved (EXIF
    orientation; mode RGB or L) is saved in its own mode with the source's quantisation
    tables and subsampling: about the same quality at about the same size (a PNG of it is
    5-10x larger). Other JPEGs (CMYK, ...) and lossy WebPs are saved at quality 95, lossless
    WebPs losslessly, everything else as PNG.
    """
    buffer = io.BytesIO()
    if fmt in ("JPEG", "MPO"):
        if tables is not None and source.mode in ("RGB", "L"):
            options: dict[str, Any] = {"qtables": tables.qtables}
            if source.mode == "RGB" and tables.subsampling != -1:
                options["subsampling"] = tables.subsampling
            for key in ("icc_profile", "exif"):  # exif_transpose dropped the orientation tag
                if source.info.get(key):
                    options[key] = source.info[key]
            source.save(buffer, format="JPEG", **options)
        else:
            normalised.save(buffer, format="JPEG", quality=REENCODE_QUALITY)
        return buffer.getvalue(), "JPEG"
    if fmt == "WEBP":
        if _webp_lossless(data):
            normalised.save(buffer, format="WEBP", lossless=True)
        else:
            normalised.save(buffer, format="WEBP", quality=REENCODE_QUALITY)
        return buffer.getvalue(), "WEBP"
    normalised.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue(), "PNG"


_BOMB_FILTER = ("error", None, Image.DecompressionBombWarning, None, 0)


def raise_bomb_warnings() -> None:
    """Make PIL's DecompressionBombWarning an error in this process (a worker's setup)."""
    if not warnings.filters or warnings.filters[0] != _BOMB_FILTER:
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


@contextlib.contextmanager
def _bomb_warnings_caught() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def bomb_warnings_as_errors() -> contextlib.AbstractContextManager:
    """A context in which DecompressionBombWarning raises. Entering ``catch_warnings`` and
    changing the filters costs ~60 us an image (it also resets the warnings caches), so
    while :func:`raise_bomb_warnings` has made it the first filter this is a no-op."""
    if warnings.filters and warnings.filters[0] == _BOMB_FILTER:
        return contextlib.nullcontext()
    return _bomb_warnings_caught()


def draft_jpeg(im: Image.Image, cfg: DecodeConfig) -> tuple[int, int] | None:
    """Before ``load()``: ask libjpeg for a 1/2, 1/4 or 1/8 scale decode whose shorter side
    is still >= ``cfg.model_max_side``; returns the full (width, height) when it did.

    Only for a JPEG whose shorter side is at least twice ``model_max_side`` and whose bytes
    ``curated/`` keeps as they came (RGB or L, EXIF orientation 1, ``keep_original_bytes``),
    so that nothing is ever re-encoded from the reduced pixels. The model's image is then
    resized from the drafted pixels to the same size as from a full decode (the usual
    bicubic resize, then the model's own resize / crop); libjpeg still reads every byte,
    so truncated and corrupt files fail as before.
    """
    side = cfg.model_max_side
    if not (cfg.jpeg_draft and cfg.keep_original_bytes and side):
        return None
    if im.format != "JPEG" or im.mode not in ("RGB", "L"):
        return None
    full = im.size
    if min(full) < 2 * side:
        return None
    try:
        if exif_orientation(im) != 1:
            return None
    except Exception:  # decode_image records the unreadable EXIF block itself
        return None
    im.draft(im.mode, (side, side))
    return full if im.size != full else None


def decode_image(data: Any, cfg: DecodeConfig) -> DecodedImage:
    """Validate and normalise encoded image bytes. Raises :class:`RecordError`."""
    if data is None:
        raise RecordError(Reason.IMAGE_MISSING, "no image bytes")
    if not isinstance(data, bytes):
        raise RecordError(Reason.COLUMN_TYPE_INVALID, f"image is a {type(data).__name__}")
    if len(data) == 0:
        raise RecordError(Reason.IMAGE_EMPTY, "image has 0 bytes")
    if len(data) > cfg.max_bytes:
        raise RecordError(
            Reason.IMAGE_BYTES_TOO_LARGE, f"image has {len(data)} bytes > {cfg.max_bytes}"
        )
    notes: list[str] = []
    with bomb_warnings_as_errors():
        try:
            im = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _pil_error(Reason.IMAGE_TOO_LARGE, err) from err
        except UnidentifiedImageError as err:
            raise _pil_error(Reason.IMAGE_UNDECODABLE, err) from err
        except Exception as err:  # PIL plugins raise many types on a broken header
            raise _pil_error(Reason.IMAGE_UNDECODABLE, err) from err
        fmt = im.format or "unknown"
        width, height = im.size
        if width < 1 or height < 1:
            raise RecordError(Reason.IMAGE_TOO_SMALL, f"image is {width}x{height}")
        if width * height > cfg.max_pixels:
            raise RecordError(
                Reason.IMAGE_TOO_LARGE,
                f"{width}x{height} = {width * height} pixels > {cfg.max_pixels}",
            )
        full_size = draft_jpeg(im, cfg)
        try:
            if getattr(im, "is_animated", False):
                im.seek(0)
                notes.append(f"first_frame_of:{getattr(im, 'n_frames', '?')}")
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise _pil_error(Reason.IMAGE_TOO_LARGE, err) from err
        except Exception as err:  # truncated / corrupt pixel data: many exception types
            raise _pil_error(_classify_load_error(err), err) from err
    original_mode = im.mode
    tables = JpegTables.of(im)  # exif_transpose returns an image without them
    try:
        orientation = exif_orientation(im)
    except Exception as err:  # a broken EXIF block does not make the pixels wrong
        orientation = 1
        notes.append(f"exif_unreadable:{type(err).__name__}")
    if orientation not in (1, 2, 3, 4, 5, 6, 7, 8):
        notes.append(f"exif_orientation_invalid:{orientation}")
        orientation = 1
    if orientation != 1:
        try:
            im = ImageOps.exif_transpose(im)
            notes.append(f"exif_orientation:{orientation}")
        except Exception as err:
            notes.append(f"exif_unreadable:{type(err).__name__}")
    rgb, mode_note = to_rgb(im, tuple(cfg.alpha_background), fmt)
    if mode_note:
        notes.append(mode_note)
    width, height = full_size or rgb.size
    short, long = min(width, height), max(width, height)
    if short < cfg.min_side:
        raise RecordError(
            Reason.IMAGE_TOO_SMALL, f"{width}x{height}: shorter side < {cfg.min_side}"
        )
    if long / short > cfg.max_aspect_ratio:
        raise RecordError(
            Reason.IMAGE_BAD_ASPECT, f"{width}x{height}: aspect {long / short:.1f} too extreme"
        )
    untouched = (
        cfg.keep_original_bytes
        and orientation == 1
        and not any(n.startswith("first_frame") for n in notes)
        and original_mode in ("RGB", "L")
        and fmt in ("JPEG", "PNG", "WEBP")
    )
    stored_format = fmt
    if untouched:
        out = data
    else:
        out, stored_format = stored_encoding(im, rgb, fmt, data, tables)
        notes.append(f"reencoded_{stored_format.lower()}")
        if stored_format != fmt:
            notes.append(f"from:{fmt}")
    model_image = rgb
    if cfg.model_max_side and short > cfg.model_max_side:
        side = cfg.model_max_side
        # The long side truncated, as torchvision's Resize and transformers' image processors
        # size it: at the model's own side the model's resize of this copy is then the
        # identity, and the copy is what the model would make of the full-size image.
        resized_long = int(side * long / short)
        size = (side, resized_long) if width <= height else (resized_long, side)
        if rgb.size != size:  # a drafted JPEG can be decoded at exactly this size
            model_image = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    pixels = np.asarray(model_image, dtype=np.uint8)
    return DecodedImage(
        pixels=pixels, data=out, format=stored_format, width=width, height=height, notes=notes
    )


# --- image paths -----------------------------------------------------------------------------


def _scheme(path: str) -> str:
    return path.split("://", 1)[0] if "://" in path else ""


def resolve_image_path(path: Any, root: str | None) -> str:
    """The full path of an image named by a record, confined to ``root``."""
    if not isinstance(path, str) or not path.strip() or "\x00" in path:
        raise RecordError(Reason.PATH_INVALID, f"invalid image path {path!r}")
    path = path.strip()
    root = root or "."
    if _scheme(path) and _scheme(path) != _scheme(root):
        raise RecordError(
            Reason.PATH_OUTSIDE_ROOT, f"{path!r} is not under the image root {root!r}"
        )
    if not _scheme(root):
        real_root = os.path.realpath(root)
        full = os.path.realpath(os.path.join(real_root, path))
        if full != real_root and not full.startswith(real_root.rstrip(os.sep) + os.sep):
            raise RecordError(
                Reason.PATH_OUTSIDE_ROOT, f"{path!r} resolves outside the image root {root!r}"
            )
        return full
    prefix = root.split("://", 1)[1].rstrip("/")
    rest = path.split("://", 1)[1] if _scheme(path) else posixpath.join(prefix, path)
    rest = posixpath.normpath(rest)
    if not rest.startswith(prefix + "/"):
        raise RecordError(
            Reason.PATH_OUTSIDE_ROOT, f"{path!r} resolves outside the image root {root!r}"
        )
    return f"{_scheme(root)}://{rest}"


def read_image_file(full: str, max_bytes: int) -> bytes:
    """Bytes of an image file, bounded by ``max_bytes``."""
    if not _scheme(full):
        if not os.path.lexists(full):
            raise RecordError(Reason.PATH_MISSING, f"no file at {full}")
        if not os.path.isfile(full):
            raise RecordError(Reason.PATH_UNREADABLE, f"{full} is not a regular file")
    try:
        with FileSystems.open(full, compression_type="uncompressed") as fh:
            data = fh.read(max_bytes + 1)
    except FileNotFoundError as err:
        raise _pil_error(Reason.PATH_MISSING, err) from err
    except (OSError, ValueError) as err:
        reason = Reason.PATH_UNREADABLE
        if _scheme(full) and not FileSystems.exists(full):
            reason = Reason.PATH_MISSING
        raise RecordError(reason, str(err), type(err).__name__) from err
    if len(data) > max_bytes:
        raise RecordError(Reason.IMAGE_BYTES_TOO_LARGE, f"{full} has more than {max_bytes} bytes")
    return data


# --- the DoFns -------------------------------------------------------------------------------


def decode_record(
    record: dict[str, Any], dcfg: DecodeConfig, ccfg: CaptionConfig
) -> dict[str, Any]:
    """A raw record -> the pair handed to the model. Raises :class:`RecordError`."""
    if record.get("error"):
        reason, error_class, message = record["error"]
        raise RecordError(Reason(reason), message, error_class)
    data = record.get("image")
    if data is None and record.get("image_path") is not None:
        full = resolve_image_path(record["image_path"], record.get("image_root"))
        data = read_image_file(full, dcfg.max_bytes)
    caption, caption_notes = normalise_caption(record.get("caption"), ccfg)
    image = decode_image(data, dcfg)
    return {
        "uid": record["uid"],
        "source": record["source"],
        "source_index": record["source_index"],
        "image_path": record.get("image_path"),
        "image": image.data,
        "image_format": image.format,
        "width": image.width,
        "height": image.height,
        "decode_notes": ",".join(image.notes + caption_notes),
        "pixels": image.pixels,
        "caption": caption,
        "original_caption": caption,
        "columns": record.get("columns") or {},
    }


class DecodeFn(beam.DoFn):
    """(uid, record) -> (uid, pair), or an ``errors/`` row on the ``errors`` tag."""

    def __init__(
        self, decode: DecodeConfig, caption: CaptionConfig, namespace: str = "capgap"
    ) -> None:
        self.decode = decode
        self.caption = caption
        self.namespace = namespace

    def setup(self) -> None:
        # PIL refuses images above 2 * MAX_IMAGE_PIXELS before our own bound can answer;
        # lift its bound in this worker if the configured one is higher.
        if Image.MAX_IMAGE_PIXELS is not None and self.decode.max_pixels > Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.decode.max_pixels
        raise_bomb_warnings()
        self.ok = Metrics.counter(self.namespace, "decoded")

    def start_bundle(self) -> None:
        self._decoded = 0  # counted here, bumped once a bundle (an inc() costs ~1 us)

    def finish_bundle(self) -> None:
        if self._decoded:
            self.ok.inc(self._decoded)
            self._decoded = 0

    def process(self, element: tuple[str, dict]) -> Iterator[Any]:
        uid, record = element
        try:
            pair = decode_record(record, self.decode, self.caption)
        except RecordError as err:
            stage = Stage.READ if record.get("error") else Stage.DECODE
            yield beam.pvalue.TaggedOutput(
                ERRORS, error_row(record, stage, err.reason, err.error_class, err.message)
            )
            return
        except Exception as err:  # dead-letter anything unforeseen, with its class and text
            yield beam.pvalue.TaggedOutput(
                ERRORS,
                error_row(
                    record,
                    Stage.DECODE,
                    Reason.INTERNAL_ERROR,
                    type(err).__name__,
                    exception_message(err),
                ),
            )
            return
        self._decoded += 1
        yield uid, pair


class DecodeRecords(beam.PTransform):
    """(uid, record) -> tagged ``ok`` (uid, pair) and ``errors`` rows (``decoded`` counted
    under ``namespace``)."""

    def __init__(
        self, decode: DecodeConfig, caption: CaptionConfig, namespace: str = "capgap"
    ) -> None:
        super().__init__()
        self.decode = decode
        self.caption = caption
        self.namespace = namespace

    def expand(self, records):
        fn = DecodeFn(self.decode, self.caption, self.namespace)
        return records | "Decode" >> beam.ParDo(fn).with_outputs(ERRORS, main="ok")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        with open(path, "rb") as fh:
            try:
                image = decode_image(fh.read(), DecodeConfig())
            except RecordError as err:
                print(f"{path}: {err.reason.value} ({err.error_class}): {err.message}")
                continue
        print(f"{path}: {image.format} {image.width}x{image.height} notes={image.notes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
