"""Timing helpers shared by the benchmark scripts (not part of the library)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

Operation = Callable[[int], object]


def measure(
    operation: Operation,
    rounds: int,
    warmup: int = 50,
    prepare: Operation | None = None,
) -> list[float]:
    """Run `operation(i)` `rounds` times after a warm-up; return the durations in seconds.

    `prepare(i)`, when given, runs before each `operation(i)`, outside the timed region.
    """
    for i in range(warmup):
        if prepare is not None:
            prepare(-1 - i)
        operation(-1 - i)
    durations = []
    for i in range(rounds):
        if prepare is not None:
            prepare(i)
        start = time.perf_counter()
        operation(i)
        durations.append(time.perf_counter() - start)
    return durations


def median(durations: list[float]) -> float:
    return statistics.median(durations)


def p99(durations: list[float]) -> float:
    ordered = sorted(durations)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def interleaved(
    pairs: dict[str, tuple[Operation, Operation]],
    rounds: int,
    blocks: int = 5,
    prepare: Mapping[str, Operation] | None = None,
) -> dict[str, tuple[list[float], list[float]]]:
    """Measure library and raw operations in alternating blocks, so drift hits both alike.

    `prepare[name]`, when given, runs untimed before each library operation of that name.
    """
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    per_block = max(1, rounds // blocks)
    for _ in range(blocks):
        for name, (library, raw) in pairs.items():
            setup = None if prepare is None else prepare.get(name)
            results[name][0].extend(measure(library, per_block, 10, setup))
            results[name][1].extend(measure(raw, per_block, 10))
    return results
