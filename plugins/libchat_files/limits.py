"""What a receiver accepts, and how much room its ``.part`` files may take.

A client that accepts every offer by itself (``accept_files``) would
otherwise let any sender fill its disk: offer a file, send all but its last
byte, abort, and start again under another SHA-256, each attempt leaving a
hidden ``.part`` kept "for a resume". These settings, read from the
client's ``options``, bound that:

=====================  ===========  ==============================================
option                 default      meaning
=====================  ===========  ==============================================
``max_file_size``      none         largest offer accepted automatically (bytes)
``accept_files_from``  anyone       only these senders' offers are accepted
                                    automatically (names, or ``"a,b"``)
``part_quota``         4 GiB        bytes all ``.part`` files in the folder may
                                    take: transfers in progress count at their
                                    full size, leftovers at theirs
``max_part_files``     32           ``.part`` files in the folder, in progress
                                    or left over
``part_max_age``       86400 (1 d)  seconds a left-over ``.part`` is kept
=====================  ===========  ==============================================

An automatic accept that cannot fit even after the oldest leftovers are
deleted is declined. The quota, count and age also decide which leftovers
stay after a transfer fails (see :func:`libchat_files.storage.tidy_parts`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from libchat.errors import ChatError
from libchat.protocol import check_nick, fold

DEFAULT_PART_QUOTA: Final = 4 << 30
DEFAULT_MAX_PART_FILES: Final = 32
DEFAULT_PART_MAX_AGE: Final = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class ReceiveLimits:
    """The receiver's limits (see the module docstring)."""

    max_file_size: int | None = None
    #: folded names; None: anyone
    accept_from: frozenset[str] | None = None
    part_quota: int = DEFAULT_PART_QUOTA
    max_part_files: int = DEFAULT_MAX_PART_FILES
    part_max_age: float = DEFAULT_PART_MAX_AGE

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ReceiveLimits:
        """The limits ``options`` set; ValueError names a bad one."""
        max_size = options.get("max_file_size")
        return cls(
            max_file_size=None if max_size is None else _whole(options, "max_file_size"),
            accept_from=_senders(options.get("accept_files_from")),
            part_quota=_whole(options, "part_quota", DEFAULT_PART_QUOTA),
            max_part_files=_whole(options, "max_part_files", DEFAULT_MAX_PART_FILES),
            part_max_age=_seconds(options, "part_max_age", DEFAULT_PART_MAX_AGE),
        )

    def refusal(self, sender: str, size: int) -> str | None:
        """Why an offer of ``size`` bytes from ``sender`` is not accepted
        automatically; None if it is."""
        if self.accept_from is not None and fold(sender) not in self.accept_from:
            return "not accepting files from you"
        if self.max_file_size is not None and size > self.max_file_size:
            return f"the file is {size} bytes; this receiver's limit is {self.max_file_size}"
        if size > self.part_quota:
            return f"the file is {size} bytes; this receiver has room for {self.part_quota}"
        return None


def _whole(options: Mapping[str, Any], key: str, default: int = 0) -> int:
    value = options.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"option {key!r} must be a whole number >= 0, not {value!r}")
    return value


def _seconds(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"option {key!r} must be a number of seconds >= 0, not {value!r}")
    return float(value)


def _senders(value: Any) -> frozenset[str] | None:
    """``accept_files_from`` as folded names: a list of names, or one string
    of names separated by commas (as ``--accept-files-from a,b`` gives)."""
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    try:
        return frozenset(fold(check_nick(str(n).strip())) for n in names if str(n).strip())
    except ChatError as exc:
        raise ValueError(f"option 'accept_files_from': {exc.message}") from None
