"""Progress of a transfer: bytes, rate and time left.

Shown only on a terminal: :func:`bar_for` gives a one-line bar redrawn in
place (``\\r``) on a stream that is a TTY and ``None`` otherwise, so scripts
and pipes stay quiet. In the interactive chat client, where a prompt owns
the last line, :class:`LineProgress` prints a full line now and then instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def human_size(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in _UNITS:
        if abs(n) < 1024 or unit == _UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_time(seconds: float) -> str:
    """``75`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    total = round(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02}:{secs:02}" if hours else f"{minutes}:{secs:02}"


class Progress(Protocol):
    def update(self, done: int) -> None:
        """``done`` bytes of the file are now transferred."""

    def finish(self, ok: bool) -> None:
        """The transfer is over (``ok``: complete and verified)."""


class _Meter:
    """What a progress display shows, computed from byte counts."""

    def __init__(self, label: str, total: int, start: int, clock: Callable[[], float]) -> None:
        self.label = label
        self.total = total
        self.start = start
        self.done = start
        self.clock = clock
        self.began = clock()

    def line(self, width: int = 20) -> str:
        elapsed = max(self.clock() - self.began, 1e-6)
        rate = (self.done - self.start) / elapsed
        share = self.done / self.total if self.total else 1.0
        filled = int(share * width)
        bar = "#" * filled + "-" * (width - filled)
        left = (
            human_time((self.total - self.done) / rate) + " left"
            if rate > 0 and self.done < self.total
            else "--:-- left"
            if self.done < self.total
            else human_time(elapsed)
        )
        return (
            f"{self.label} [{bar}] {share:4.0%} {human_size(self.done)}/{human_size(self.total)}"
            f"  {human_size(rate)}/s  {left}"
        )


class BarProgress:
    """A bar redrawn in place on a terminal, at most ``fps`` times a second."""

    def __init__(
        self,
        stream: TextIO,
        label: str,
        total: int,
        start: int = 0,
        *,
        fps: float = 8.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.meter = _Meter(label, total, start, clock)
        self.interval = 1.0 / fps
        self._shown = -self.interval
        self._width = 0

    def update(self, done: int) -> None:
        self.meter.done = done
        now = self.meter.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self._draw()

    def _draw(self) -> None:
        text = self.meter.line()
        pad = " " * max(self._width - len(text), 0)
        self._width = len(text)
        self.stream.write(f"\r{text}{pad}")
        self.stream.flush()

    def finish(self, ok: bool) -> None:
        self._draw()
        self.stream.write("\n" if ok else " (failed)\n")
        self.stream.flush()


class LineProgress:
    """Whole lines through ``out`` every ``interval`` seconds, for a client
    whose last line belongs to an input prompt."""

    def __init__(
        self,
        out: Callable[[str], None],
        label: str,
        total: int,
        start: int = 0,
        *,
        interval: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.out = out
        self.meter = _Meter(label, total, start, clock)
        self.interval = interval
        self._shown = self.meter.began

    def update(self, done: int) -> None:
        self.meter.done = done
        now = self.meter.clock()
        if now - self._shown >= self.interval:
            self._shown = now
            self.out(self.meter.line())

    def finish(self, ok: bool) -> None:
        pass  # the outcome line says it all


def bar_for(stream: TextIO | None, label: str, total: int, start: int = 0) -> Progress | None:
    """A :class:`BarProgress` on ``stream`` if it is a terminal, else None."""
    if stream is None or not _isatty(stream):
        return None
    return BarProgress(stream, label, total, start)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
