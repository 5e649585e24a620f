"""Which bcrypt cost an unknown name is checked at.

A login for a name that has no account is still checked, against a dummy
hash, so that it costs what a wrong password for a real account costs. That
only holds if the dummy hash has the cost of the real ones, and those are not
necessarily the server's configured cost: ``chat user add`` hashes at 12 by
default, whatever ``--bcrypt-rounds`` the server runs with, and a server whose
cost was changed keeps the old hashes until their owners log in again (they
are rehashed then). So the server keeps a census of the costs in the store,
read at startup and again every :data:`REFRESH_AFTER` seconds (``chat user``
may change the file meanwhile), and kept current between reads by its own
registrations and rehashes. Unknown names are checked at the most common
cost: the fewest real accounts then differ in timing from a name that does
not exist.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Mapping

#: Seconds before the census is read from the store again.
REFRESH_AFTER = 60.0


class CostCensus:
    """How many stored hashes use each bcrypt cost."""

    def __init__(
        self,
        configured: int,
        *,
        refresh_after: float = REFRESH_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: The cost new hashes are made with; the answer for an empty store.
        self.configured = configured
        self.refresh_after = refresh_after
        self.clock = clock
        self.counts: Counter[int] = Counter()
        self._read_at: float | None = None

    def stale(self) -> bool:
        """Whether the store should be read again."""
        return self._read_at is None or self.clock() - self._read_at >= self.refresh_after

    def replace(self, counts: Mapping[int, int]) -> None:
        """The counts just read from the store."""
        self.counts = Counter({cost: n for cost, n in counts.items() if n > 0})
        self._read_at = self.clock()

    def added(self, cost: int | None) -> None:
        if cost is not None:
            self.counts[cost] += 1

    def changed(self, old: int | None, new: int) -> None:
        """One hash went from cost ``old`` to ``new``."""
        if old is not None and self.counts[old] > 0:
            self.counts[old] -= 1
        self.counts[new] += 1

    def dummy_cost(self) -> int:
        """The cost to check an unknown name at: the most common one in the
        store (on a tie, the higher), or the configured cost if it is empty."""
        counts = +self.counts  # only positive counts
        if not counts:
            return self.configured
        return max(counts, key=lambda cost: (counts[cost], cost))

    def others(self) -> dict[int, int]:
        """The hashes whose cost is not the configured one, by cost."""
        return {
            cost: n for cost, n in sorted(self.counts.items()) if n > 0 and cost != self.configured
        }
