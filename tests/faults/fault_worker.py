"""A second application process for the history checker: `python fault_worker.py CONFIG OUT`.

CONFIG is a JSON file naming the docstore DSN and table, the Redis URL, the
store settings, the sessions and the deadline; the process runs
`fault_history.run_worker` in a few threads on a SessionStore, or with
`"async": true` `fault_history.run_async_worker` in as many tasks on an
AsyncSessionStore, and writes every recorded call to OUT as JSON (`ops`).

The asyncio process runs its loop in debug mode with a slow-callback
threshold of 20 ms: every "Executing ... took" warning asyncio logs (a call
that blocked the loop) is written to OUT too (`slow_callbacks`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import redis.asyncio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fault_history import Recorder, op_to_dict, run_async_worker, run_worker  # noqa: E402

from docstore import AsyncPostgresDocumentStore, PostgresDocumentStore  # noqa: E402
from session import AsyncSessionStore, SessionStore  # noqa: E402
from session.config import redis_client_from_url  # noqa: E402

SLOW_CALLBACK = 0.02  # seconds: a callback running longer blocked the loop


class SlowCallbacks(logging.Handler):
    """Collect asyncio's debug-mode warnings about callbacks that ran too long."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.found: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("Executing "):
            self.found.append(message[:500])


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


def async_redis_client(url: str) -> redis.asyncio.Redis:
    """The library's fail-fast asyncio client (the twin of `redis_client_from_url`)."""
    try:
        from session.config import async_redis_client_from_url
    except ImportError:  # the same settings, spelled out
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from session.config import REDIS_SOCKET_TIMEOUT

        return redis.asyncio.Redis.from_url(
            url,
            socket_timeout=REDIS_SOCKET_TIMEOUT,
            socket_connect_timeout=REDIS_SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
    return async_redis_client_from_url(url)


async def run_tasks(config: dict[str, Any], recorder: Recorder) -> None:
    loop = asyncio.get_running_loop()
    loop.slow_callback_duration = SLOW_CALLBACK
    docstore = AsyncPostgresDocumentStore(
        config["dsn"], table=config["table"], **config["docstore"]
    )
    cache = async_redis_client(config["redis_url"])
    store = AsyncSessionStore(docstore, cache, **config["session"])
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
        logging.getLogger("asyncio").addHandler(slow)
        asyncio.run(run_tasks(config, recorder), debug=True)
    else:
        run_threads(config, recorder)
    Path(out_path).write_text(
        json.dumps({"ops": [op_to_dict(op) for op in recorder.ops], "slow_callbacks": slow.found})
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
