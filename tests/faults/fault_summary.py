"""What the fault suite did: operations, faults injected, violations, latency per fault."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterable

__all__ = ["FaultSummary", "p99"]


def p99(durations: Iterable[float]) -> float:
    ordered = sorted(durations)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


class FaultSummary:
    """A session-wide tally the fault tests add to; printed at the end of the run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.operations = 0
        self.faults: Counter[str] = Counter()
        self.violations: list[str] = []
        self.latencies: defaultdict[str, list[float]] = defaultdict(list)
        self.notes: list[str] = []

    def add_operations(self, count: int) -> None:
        with self._lock:
            self.operations += count

    def add_fault(self, kind: str) -> None:
        with self._lock:
            self.faults[kind] += 1

    def add_latencies(self, kind: str, durations: Iterable[float]) -> None:
        with self._lock:
            self.latencies[kind].extend(durations)

    def add_violations(self, violations: Iterable[str]) -> None:
        with self._lock:
            self.violations.extend(violations)

    def add_note(self, note: str) -> None:
        with self._lock:
            self.notes.append(note)

    def lines(self) -> list[str]:
        with self._lock:
            lines = [
                f"operations run: {self.operations}",
                f"faults injected: {sum(self.faults.values())}",
            ]
            lines += [f"  {kind}: {count}" for kind, count in sorted(self.faults.items())]
            lines.append(f"violations: {len(self.violations)}")
            lines += [f"  {violation}" for violation in self.violations[:20]]
            lines.append("latency under each fault (p99 / max, seconds; calls):")
            for kind, durations in sorted(self.latencies.items()):
                lines.append(
                    f"  {kind}: {p99(durations):.3f} / {max(durations, default=0.0):.3f}"
                    f" ({len(durations)})"
                )
            lines += self.notes
            return lines
