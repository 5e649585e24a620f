"""Run a coroutine on the event loop the environment asks for.

::

    libchat.runner.run(main())

Like :func:`asyncio.run`, with one switch: ``LIBCHAT_UVLOOP=1`` in the
environment runs the loop on uvloop (when it is installed), without touching
the code. It is off by default because measured here it does not pay: a
libchat server's CPU per delivery was the same on uvloop, and 2,000 clients
joining one room took 8 times longer (docs/performance.md). The switch is
there to measure other loads with.
"""

from __future__ import annotations

import asyncio
import importlib
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's ``new_event_loop`` if ``LIBCHAT_UVLOOP=1`` and uvloop is
    installed, else ``None`` (the standard loop)."""
    if os.environ.get("LIBCHAT_UVLOOP", "").strip().lower() not in ("1", "yes", "true", "on"):
        return None
    try:
        # Imported by name: uvloop is optional, and type checks must pass
        # without it.
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name() -> str:
    """``"uvloop"`` or ``"asyncio"``: the loop :func:`run` would use."""
    return "asyncio" if loop_factory() is None else "uvloop"


def run(coro: Coroutine[Any, Any, T], *, debug: bool | None = None) -> T:
    """Run ``coro`` to completion in a new event loop, as :func:`asyncio.run`
    does, and return its result."""
    with asyncio.Runner(debug=debug, loop_factory=loop_factory()) as runner:
        return runner.run(coro)
