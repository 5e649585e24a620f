"""Brute-force and registration-spam throttles, in memory, per server.

:class:`LoginThrottle` counts failed logins per key (an account name, or a
client address). Up to ``allowed`` failures cost nothing; after that the key
is locked out for ``base_delay`` seconds, doubling with each further failure
up to ``max_delay``. A success clears the failures; a key with no failure for
``max_delay`` is forgotten. Logins still running count too: the failures
plus the attempts in flight may not exceed ``allowed``, so a hundred parallel
guesses cannot all slip in before the first one fails (and after a lockout,
one attempt at a time goes through).

:class:`RegistrationThrottle` allows ``limit`` new accounts per address per
``window`` seconds.

Both take a ``clock`` so tests can move time without sleeping, and both
bound their memory: an attacker inventing names or addresses can only push
out old entries.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]

#: Most keys a throttle remembers; beyond it the longest-idle ones go.
MAX_KEYS = 100_000


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why an attempt may not start now, and for how long."""

    retry_after: float
    #: True: too many attempts in flight; False: locked out by failures.
    busy: bool


@dataclass(slots=True)
class _Entry:
    failures: int = 0
    pending: int = 0
    last_failure: float = 0.0
    touched: float = 0.0


class LoginThrottle:
    def __init__(
        self,
        allowed: int,
        base_delay: float,
        max_delay: float,
        *,
        clock: Clock = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.allowed = allowed
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.clock = clock
        self.max_keys = max_keys
        self._keys: OrderedDict[str, _Entry] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.allowed > 0

    def delay(self, failures: int) -> float:
        """The lockout after ``failures`` failures in a row."""
        if failures < self.allowed:
            return 0.0
        # Cap the exponent: 2**1000 overflows a float, and max_delay wins anyway.
        return min(self.base_delay * 2.0 ** min(failures - self.allowed, 64), self.max_delay)

    def refusal(self, key: str) -> Refusal | None:
        """Why ``key`` may not try now, or None if it may."""
        if not self.enabled:
            return None
        self._forget_idle()
        entry = self._keys.get(key)
        if entry is None:
            return None
        locked = entry.last_failure + self.delay(entry.failures) - self.clock()
        if locked > 0:
            return Refusal(locked, busy=False)
        if entry.pending and entry.failures + entry.pending >= self.allowed:
            return Refusal(max(self.base_delay, 1.0), busy=True)
        return None

    def begin(self, key: str) -> None:
        """An attempt starts; end it with :meth:`failed` or :meth:`succeeded`."""
        if self.enabled:
            self._touch(key).pending += 1

    def failed(self, key: str) -> int:
        """The attempt failed; return the failures in a row for ``key``."""
        if not self.enabled:
            return 0
        entry = self._touch(key)
        entry.pending = max(entry.pending - 1, 0)
        entry.failures += 1
        entry.last_failure = entry.touched
        return entry.failures

    def succeeded(self, key: str) -> None:
        """The attempt succeeded: forget ``key``'s failures."""
        entry = self._keys.get(key)
        if entry is None:
            return
        entry.pending = max(entry.pending - 1, 0)
        entry.failures = 0
        if not entry.pending:
            del self._keys[key]

    def release(self, key: str) -> None:
        """The attempt ended without an answer (an error): no failure counted."""
        entry = self._keys.get(key)
        if entry is not None:
            entry.pending = max(entry.pending - 1, 0)

    def failures(self, key: str) -> int:
        entry = self._keys.get(key)
        return 0 if entry is None else entry.failures

    def _touch(self, key: str) -> _Entry:
        entry = self._keys.pop(key, None) or _Entry()
        entry.touched = self.clock()
        self._keys[key] = entry  # most recent last: the front is the idlest
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return entry

    def _forget_idle(self) -> None:
        horizon = self.clock() - max(self.max_delay, self.base_delay)
        keys = self._keys
        while keys:
            key, oldest = next(iter(keys.items()))
            if oldest.touched > horizon:
                break
            if oldest.pending:  # still running: keep it, look again later
                keys.move_to_end(key)
                oldest.touched = self.clock()
                continue
            keys.popitem(last=False)


class RegistrationThrottle:
    def __init__(
        self, limit: int, window: float, *, clock: Clock = time.monotonic, max_keys: int = MAX_KEYS
    ) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self.max_keys = max_keys
        self._recent: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, address: str) -> float:
        """Seconds before ``address`` may create another account; 0: now."""
        if self.limit <= 0:
            return 0.0
        now = self.clock()
        stamps = self._recent.get(address)
        if stamps is None:
            return 0.0
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if len(stamps) < self.limit:
            return 0.0
        return stamps[0] + self.window - now

    def record(self, address: str) -> None:
        if self.limit <= 0:
            return
        stamps = self._recent.pop(address, None) or deque()
        stamps.append(self.clock())
        self._recent[address] = stamps
        while len(self._recent) > self.max_keys:
            self._recent.popitem(last=False)
