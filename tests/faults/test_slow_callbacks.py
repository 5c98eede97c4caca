"""The history checker's detector of a blocked event loop (`fault_worker.SlowCallbacks`).

It must report a callback that slept in the kernel as `blocked` (the failure
the asyncio fault runs look for), and one that computed as `computed`, so
that the check that no asyncio call blocks its loop can fail.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest
from fault_worker import SLOW_CALLBACK, SlowCallbacks

pytestmark = pytest.mark.no_real_servers


@pytest.fixture
def slow() -> Iterator[SlowCallbacks]:
    run = asyncio.events.Handle._run
    watch = SlowCallbacks()
    watch.install()
    try:
        yield watch
    finally:
        asyncio.events.Handle._run = run  # type: ignore[method-assign]
        logging.getLogger("asyncio").removeHandler(watch)


def run_callback(callback: object) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = SLOW_CALLBACK
        done = loop.create_future()
        loop.call_soon(lambda: (callback(), done.set_result(None)))  # type: ignore[operator]
        await done

    asyncio.run(main(), debug=True)


def test_a_callback_that_sleeps_is_blocked(slow: SlowCallbacks) -> None:
    # A machine this busy may also deschedule the sleeper ("both", not counted
    # as blocked): a few tries find one that only slept.
    for _ in range(5):
        run_callback(lambda: time.sleep(0.05))
        if slow.blocked:
            break
    assert len(slow.blocked) >= 1
    assert "voluntary" in slow.blocked[0]


def test_a_callback_that_computes_is_not_blocked(slow: SlowCallbacks) -> None:
    def compute() -> None:
        deadline = time.thread_time() + 0.05
        while time.thread_time() < deadline:
            pass

    run_callback(compute)
    assert slow.computed != []
    assert slow.blocked == []
