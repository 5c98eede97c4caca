"""A second application process for the history checker: `python fault_worker.py CONFIG OUT`.

CONFIG is a JSON file naming the docstore DSN and table, the Redis URL, the
store settings, the sessions and the deadline; the process runs
`fault_history.run_worker` in a few threads on a SessionStore, or with
`"async": true` `fault_history.run_async_worker` in as many tasks on an
AsyncSessionStore, and writes every recorded call to OUT as JSON (`ops`).

The asyncio process runs its loop in debug mode with a slow-callback
threshold of 20 ms: every "Executing ... took" warning asyncio logs goes to
OUT too, under `blocked_loop` when the callback blocked the loop's thread,
else under `computed` or `preempted` (see `SlowCallbacks`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_history import Recorder, op_to_dict, run_async_worker, run_worker  # noqa: E402
from fault_redis import async_redis_client  # noqa: E402

from docstore import AsyncPostgresDocumentStore, PostgresDocumentStore  # noqa: E402
from session import AsyncSessionStore, SessionStore  # noqa: E402
from session.config import redis_client_from_url  # noqa: E402

SLOW_CALLBACK = 0.02  # seconds: a callback running longer blocked the loop


class SlowCallbacks(logging.Handler):
    """asyncio's debug-mode warnings about callbacks that ran too long, each with what
    the loop's thread did during that callback.

    A callback that blocked the loop waited in the kernel (a blocking socket
    call, a sleep, a lock: a voluntary context switch) for 20 ms or more (the
    time asyncio measured less the thread's CPU time), and was not
    descheduled meanwhile: `blocked`. One that did not either computed that
    long (`computed`: 20 ms of CPU time or more) or was descheduled by an
    overloaded machine (`preempted`: involuntary switches, little CPU time);
    those two are reported, not failures. A switch alone is not blocking: a
    computing callback may wait a moment for the GIL. A callback with both
    kinds of switch cannot say which one took its time (this kernel keeps no
    schedstats): it is reported as `preempted`, marked "both". A call that
    blocks the loop does so on every call under a fault, so it still shows
    as `blocked` in the callbacks the machine did not also deschedule.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.blocked: list[str] = []
        self.computed: list[str] = []
        self.preempted: list[str] = []
        self._last = (0.0, 0, 0)

    def install(self) -> None:
        """Measure every callback the loop runs (Handle._run: tasks' steps included)."""
        run = asyncio.events.Handle._run
        watch = self

        def measured(handle: asyncio.events.Handle) -> None:
            before = resource.getrusage(resource.RUSAGE_THREAD)
            cpu = time.thread_time()
            try:
                run(handle)
            finally:
                after = resource.getrusage(resource.RUSAGE_THREAD)
                watch._last = (
                    time.thread_time() - cpu,
                    after.ru_nvcsw - before.ru_nvcsw,
                    after.ru_nivcsw - before.ru_nivcsw,
                )

        asyncio.events.Handle._run = measured  # type: ignore[method-assign]
        logging.getLogger("asyncio").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if not message.startswith("Executing "):
            return
        # Logged right after the callback: _last is its measurement.
        cpu, voluntary, involuntary = self._last
        what, _, took = message.rpartition(" took ")
        found = (
            f"at {time.monotonic():.3f}: {what.split(' created at ')[0][:300]} took {took}"
            f" (CPU {cpu:.3f} s, {voluntary} voluntary and {involuntary} involuntary"
            " context switches)"
        )
        try:
            off_cpu = float(took.split()[0]) - cpu
        except ValueError:
            off_cpu = SLOW_CALLBACK  # asyncio's wording changed: count it as off the CPU
        if voluntary and not involuntary and off_cpu >= SLOW_CALLBACK:
            self.blocked.append(found)
        elif voluntary and off_cpu >= SLOW_CALLBACK:
            self.preempted.append(f"(both) {found}")
        elif cpu >= SLOW_CALLBACK:
            self.computed.append(found)
        else:
            self.preempted.append(found)


def run_threads(config: dict[str, Any], recorder: Recorder) -> None:
    docstore = PostgresDocumentStore(config["dsn"], table=config["table"], **config["docstore"])
    cache = redis_client_from_url(config["redis_url"])
    store = SessionStore(docstore, cache, **config["session"])
    threads = [
        threading.Thread(
            target=run_worker,
            args=(
                store,
                f"{config['name']}-t{number}",
                config["sessions"],
                config["user_id"],
                config["stop_at"],
                recorder,
                config["seed"] + number,
            ),
        )
        for number in range(config["threads"])
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()
    cache.close()
    docstore.close()


def build_async_store(
    config: dict[str, Any],
) -> tuple[AsyncSessionStore, AsyncPostgresDocumentStore, redis.asyncio.Redis]:
    """Built before the loop runs: constructing the asyncio store needs no event loop."""
    docstore = AsyncPostgresDocumentStore(
        config["dsn"], table=config["table"], **config["docstore"]
    )
    cache = async_redis_client(config["redis_url"])
    return AsyncSessionStore(docstore, cache, **config["session"]), docstore, cache


async def run_tasks(
    config: dict[str, Any],
    recorder: Recorder,
    built: tuple[AsyncSessionStore, AsyncPostgresDocumentStore, redis.asyncio.Redis],
) -> None:
    asyncio.get_running_loop().slow_callback_duration = SLOW_CALLBACK
    store, docstore, cache = built
    try:
        await asyncio.gather(
            *(
                run_async_worker(
                    store,
                    f"{config['name']}-a{number}",
                    config["sessions"],
                    config["user_id"],
                    config["stop_at"],
                    recorder,
                    config["seed"] + number,
                )
                for number in range(config["threads"])
            )
        )
    finally:
        await store.aclose()
        await cache.aclose()
        await docstore.aclose()


def main(config_path: str, out_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    recorder = Recorder()
    slow = SlowCallbacks()
    if config.get("async"):
        built = build_async_store(config)
        slow.install()
        asyncio.run(run_tasks(config, recorder, built), debug=True)
    else:
        run_threads(config, recorder)
    out = {
        "ops": [op_to_dict(op) for op in recorder.ops],
        "blocked_loop": slow.blocked,
        "computed": slow.computed,
        "preempted": slow.preempted,
    }
    Path(out_path).write_text(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
