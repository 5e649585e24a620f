"""Turn a file name from the network into a safe base name.

A received name never chooses a path: whatever the sender (or a hostile
server) writes, :func:`safe_filename` returns one plain, visible file name
that stays inside the download folder on POSIX and Windows alike, and is
short enough that ``.NAME.<hash>.part`` and ``NAME (99).ext`` still fit the
255-byte limit of common file systems.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

#: Longest safe name, in UTF-8 bytes (255 minus room for the .part name).
MAX_NAME_BYTES: Final = 200
#: An extension this short is kept when a long name is cut.
_MAX_EXT_CHARS: Final = 16
FALLBACK_NAME: Final = "file"

# Characters Windows refuses in names (and ':' also opens NTFS streams).
_WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
# CON, PRN, AUX, NUL, COM0-9, LPT0-9 (and the superscript digits Windows
# also treats as devices), with or without an extension.
_WINDOWS_DEVICE = re.compile(r"(CON|PRN|AUX|NUL|CONIN\$|CONOUT\$|(COM|LPT)[0-9¹²³])(\..*)?", re.I)
# Unicode categories never wanted in a name: controls, invisible format
# characters (bidi overrides that disguise an extension), line separators.
_DROPPED_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def safe_filename(name: object) -> str:
    """A safe base name for ``name``: its last path component (``/`` and
    ``\\`` both separate), without control or invisible characters, Windows'
    forbidden characters replaced by ``_``, no leading dot (nothing hidden,
    never ``.`` or ``..``), no trailing dot or space, not a Windows device
    name, at most :data:`MAX_NAME_BYTES` bytes of UTF-8; ``"file"`` when
    nothing is left."""
    if not isinstance(name, str):
        return FALLBACK_NAME
    text = unicodedata.normalize("NFC", name)
    text = "".join(
        " " if ch.isspace() else ch
        for ch in text
        if unicodedata.category(ch) not in _DROPPED_CATEGORIES or ch in "\t\n\r"
    )
    text = re.split(r"[/\\]", text)[-1]
    text = _WINDOWS_FORBIDDEN.sub("_", text)
    text = _trim(_shorten(_trim(text)))
    if not text:
        return FALLBACK_NAME
    if _WINDOWS_DEVICE.fullmatch(text):
        text = "_" + text
    return text


def _trim(text: str) -> str:
    # Leading dots hide a file (and make "." and ".."); trailing dots and
    # spaces are silently dropped by Windows, so "a.txt." would become
    # another name than the one we checked.
    return text.strip(" ").lstrip(".").rstrip(". ")


def _shorten(text: str) -> str:
    if len(text.encode("utf-8")) <= MAX_NAME_BYTES:
        return text
    stem, dot, ext = text.rpartition(".")
    if not dot or not stem or len(ext) > _MAX_EXT_CHARS:
        stem, ext = text, ""
    tail = f".{ext}" if ext else ""
    budget = MAX_NAME_BYTES - len(tail.encode("utf-8"))
    # Cut at a character boundary: decode with "ignore" drops a split char.
    cut = stem.encode("utf-8")[:budget].decode("utf-8", "ignore")
    return cut + tail


def numbered(name: str, n: int) -> str:
    """``report.pdf`` -> ``report (n).pdf``: the name tried when ``name``
    already exists (n >= 1)."""
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        return f"{name} ({n})"
    return f"{stem} ({n}).{ext}"


def part_name(name: str, sha256: str) -> str:
    """Where the bytes of ``name`` wait until their hash is checked: a hidden
    file whose name also holds the hash prefix, so that sending the same
    file again resumes it and a different file never does."""
    return f".{name}.{sha256[:16]}.part"
