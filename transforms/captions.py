"""Caption normalisation: bytes must be UTF-8; NFC; invisible and control characters out.

Control and invisible formatting characters (zero-width space, BOM, bidi overrides, soft
hyphen) are removed, whitespace is collapsed and the length bounded (``caption``
section: reject or truncate at a word boundary); emoji and ZWJ sequences are kept. A
caption with nothing left is ``caption_empty``. :mod:`capgap.transforms.decode` calls
:func:`normalise_caption` on every record.

    normalise_caption(b"a\u200bstar ", CaptionConfig())   # ('astar', [])
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any, Literal

from capgap.transforms.reasons import Reason, RecordError


@dataclass
class CaptionConfig:
    """Caption normalisation bounds."""

    max_chars: int = 2000  # after normalisation
    on_too_long: Literal["reject", "truncate"] = "reject"

    def __post_init__(self) -> None:
        if self.max_chars < 1:
            raise ValueError("caption.max_chars must be >= 1")


# Invisible formatting characters that only hide or reorder text (zero-width space, BOM,
# bidi overrides and isolates, word joiner, soft hyphen). ZWJ / ZWNJ stay: emoji and
# several scripts need them.
_INVISIBLE = frozenset(
    "\u200b\ufeff\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\u2060\u00ad"
)


# Characters that render as blank space though Unicode calls them letters or symbols
# (Hangul fillers, the braille blank, the Mongolian vowel separator).
_FILLERS = frozenset("\u115f\u1160\u3164\uffa0\u2800\u180e")
# Categories that draw nothing on their own: controls, format characters (ZWJ, ...),
# separators, and combining marks without a base.
_BLANK_CATEGORIES = frozenset({"Cc", "Cf", "Cn", "Co", "Cs", "Zs", "Zl", "Zp", "Mn", "Me"})


def _shows(ch: str) -> bool:
    """Whether ``ch`` draws something: a caption needs at least one such character."""
    return ch not in _FILLERS and unicodedata.category(ch) not in _BLANK_CATEGORIES


def _visible(text: str) -> str:
    """``text`` without invisible formatting characters; control characters become a space
    (whitespace ones: tab, newline, ...) or nothing. NFC comes after these removals, so an
    invisible character between a letter and its combining mark cannot keep the pair apart
    (and normalising twice changes nothing)."""
    chars = []
    for ch in text:
        if ch in _INVISIBLE:
            continue
        if unicodedata.category(ch) == "Cc":
            chars.append(" " if ch.isspace() else "")
        else:
            chars.append(ch)
    return "".join(chars)


def normalise_caption(raw: Any, cfg: CaptionConfig) -> tuple[str, list[str]]:
    """(normalised caption, notes). Raises :class:`RecordError` with a caption reason."""
    notes: list[str] = []
    if raw is None:
        raise RecordError(Reason.CAPTION_MISSING, "no caption")
    if isinstance(raw, bytes | bytearray | memoryview):
        try:
            text = bytes(raw).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RecordError(Reason.CAPTION_NOT_UTF8, str(err), "UnicodeDecodeError") from err
    elif isinstance(raw, str):
        text = raw
        try:
            text.encode("utf-8")  # lone surrogates (e.g. CSV bytes read with surrogateescape)
        except UnicodeEncodeError as err:
            raise RecordError(Reason.CAPTION_NOT_UTF8, str(err), "UnicodeEncodeError") from err
    else:
        raise RecordError(
            Reason.CAPTION_TYPE_INVALID, f"caption is a {type(raw).__name__}, not text"
        )
    if text.isascii() and text.isprintable():
        # Printable ASCII (most alt-text) holds no control or invisible characters and is
        # its own NFC form: only the whitespace is left to collapse, and every character
        # left after that draws something.
        text = " ".join(text.split())
        visible = bool(text)
    else:
        text = " ".join(unicodedata.normalize("NFC", _visible(text)).split())
        visible = any(_shows(ch) for ch in text)
    if not visible:
        raise RecordError(Reason.CAPTION_EMPTY, "caption has no visible character")
    if len(text) > cfg.max_chars:
        if cfg.on_too_long == "reject":
            raise RecordError(
                Reason.CAPTION_TOO_LONG, f"caption has {len(text)} chars > {cfg.max_chars}"
            )
        cut = text[: cfg.max_chars]
        text = cut.rsplit(" ", 1)[0] if " " in cut else cut
        notes.append("caption_truncated")
    return text, notes
