"""The history checker: two or three processes, several threads, faults on a schedule, checks.

The parent process runs workers on one SessionStore, each child process
(`fault_worker.py`) three more on its own store (the last child: three
asyncio tasks on an AsyncSessionStore, its loop in debug mode, where no
callback may block the loop for 20 ms or more), all through the proxies to a
private redis-server and the embedded PostgreSQL, while the main thread injects
every kind of fault in turn. Each call is recorded; `fault_history.check` then
reports lost writes, stale reads, untyped errors and slow calls
(its rules are pinned by `test_fault_history_rules.py`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_history import FaultWindow, Op, Recorder, check, op_from_dict, run_worker
from fault_proxy import FaultProxy, tcp_dsn
from fault_redis import RedisProcess
from fault_summary import FaultSummary

from docstore import PostgresDocumentStore
from session import SessionStore
from session.config import redis_client_from_url

pytestmark = [pytest.mark.faults, pytest.mark.embedded]

CACHE_TTL = 3.0
# The store's default statement_timeout (5 s): the watchdog's probe fails a partitioned
# call in about 1.5 s. connect_timeout 1 bounds connecting during a partition.
DOCSTORE_SETTINGS = {"connect_timeout": 1}
LATENCY_BOUND = 2.0
CHILD_THREADS = 3
SESSIONS = 6


def fault_schedule(
    redis_process: RedisProcess, redis_proxy: FaultProxy, pg_proxy: FaultProxy
) -> list[tuple[str, bool, Callable[[], None], Callable[[], None], float]]:
    """Each fault: name, is it a Redis fault, inject, repair, how long it lasts (seconds)."""
    return [
        ("redis SIGSTOP", True, redis_process.pause, redis_process.resume, 1.5),
        ("redis partition", True, redis_proxy.partition, redis_proxy.heal, 1.5),
        ("postgres partition", False, pg_proxy.partition, pg_proxy.heal, 1.5),
        ("redis kill -9, restart with AOF", True, redis_process.kill, redis_process.start, 1.0),
        ("postgres connection cut", False, pg_proxy.cut, pg_proxy.resume, 1.0),
        (
            "redis kill -9, restart empty",
            True,
            redis_process.kill,
            lambda: (redis_process.wipe(), redis_process.start()),
            0.5,
        ),
    ]


@pytest.mark.parametrize(
    ("processes", "parent_threads"), [(2, 4), (3, 3)], ids=["2-processes", "3-processes"]
)
def test_history_has_no_violations_under_faults(
    processes: int,
    parent_threads: int,
    embedded_dsn: str,
    pg_proxy: FaultProxy,
    redis_proxy: FaultProxy,
    redis_process: RedisProcess,
    pg_table: str,
    key_prefix: str,
    tmp_path: Path,
    fault_summary: FaultSummary,
) -> None:
    dsn = tcp_dsn(embedded_dsn, pg_proxy.port)
    redis_url = f"redis://127.0.0.1:{redis_proxy.port}/0"
    session_settings = {"cache_ttl": CACHE_TTL, "key_prefix": key_prefix}
    docstore = PostgresDocumentStore(dsn, table=pg_table, **DOCSTORE_SETTINGS)
    cache = redis_client_from_url(redis_url)
    store = SessionStore(docstore, cache, **session_settings)  # type: ignore[arg-type]
    truth_docstore = PostgresDocumentStore(embedded_dsn, table=pg_table)
    truth = SessionStore(truth_docstore, None)
    try:
        session_ids = [store.create_session("checker", {"n": 0}).id for _ in range(SESSIONS)]
        schedule = fault_schedule(redis_process, redis_proxy, pg_proxy)
        warmup = 1.5  # the child imports and connects meanwhile
        duration = warmup + sum(length + 1.0 for *_, length in schedule) + 1.0
        stop_at = time.monotonic() + duration
        children = []
        for number in range(1, processes):
            # The last child runs asyncio workers on an AsyncSessionStore (see fault_worker.py).
            asynchronous = number == processes - 1
            config = {
                "async": asynchronous,
                "name": f"child{number}",
                "dsn": dsn,
                "table": pg_table,
                "redis_url": redis_url,
                "docstore": DOCSTORE_SETTINGS,
                "session": session_settings,
                "sessions": session_ids,
                "user_id": "checker",
                "stop_at": stop_at,
                "threads": CHILD_THREADS,
                "seed": 1000 * number,
            }
            config_path = tmp_path / f"worker{number}.json"
            out_path = tmp_path / f"child{number}-ops.json"
            config_path.write_text(json.dumps(config))
            child = subprocess.Popen(
                [
                    sys.executable,
                    str(Path(__file__).with_name("fault_worker.py")),
                    str(config_path),
                    str(out_path),
                ]
            )
            children.append((child, out_path))
        recorder = Recorder()
        threads = [
            threading.Thread(
                target=run_worker,
                args=(store, f"parent-t{n}", session_ids, "checker", stop_at, recorder, n),
            )
            for n in range(parent_threads)
        ]
        for thread in threads:
            thread.start()
        windows: list[FaultWindow] = []
        time.sleep(warmup)  # the schedule: faults start once both processes are running
        for name, is_redis, inject, repair, length in schedule:
            started = time.monotonic()
            inject()
            fault_summary.add_fault(name)
            time.sleep(length)  # the schedule: how long the fault lasts
            repair()
            windows.append(FaultWindow(name, started, time.monotonic(), is_redis))
            time.sleep(1.0)  # the schedule: a healthy spell between faults
        for thread in threads:
            thread.join(timeout=30)
        ops: list[Op] = list(recorder.ops)
        blocked_loop: list[str] = []
        computed: list[str] = []
        preempted: list[str] = []
        for child, out_path in children:
            assert child.wait(timeout=60) == 0
            out = json.loads(out_path.read_text())
            ops += [op_from_dict(item) for item in out["ops"]]
            blocked_loop += out["blocked_loop"]
            computed += out["computed"]
            preempted += out["preempted"]
        coverage: Counter[str] = Counter()
        violations = check(
            ops,
            coverage=coverage,
            truth=truth,
            session_ids=session_ids,
            windows=windows,
            cache_ttl=CACHE_TTL,
            latency_bound=LATENCY_BOUND,
        )
        record(fault_summary, ops, windows, processes)
        fault_summary.add_note(
            f"checker ({processes} processes): "
            + ", ".join(f"{name} {count}" for name, count in sorted(coverage.items()))
        )
        fault_summary.add_note(
            f"checker ({processes} processes): asyncio callbacks over 20 ms: "
            f"{len(blocked_loop)} blocking, {len(computed)} computing (CPU >= 20 ms), "
            f"{len(preempted)} only descheduled"
            + "".join(f"\n  computing: {found}" for found in computed)
        )
        fault_summary.add_violations(violations)
        assert len({op.worker.split("-")[0] for op in ops}) == processes, "every process ran"
        assert any("-a" in op.worker for op in ops), "the asyncio workers ran"
        assert violations == []
        # No call of the asyncio store blocked its loop for 20 ms or more.
        assert blocked_loop == []
    finally:
        store.close()
        cache.close()
        docstore.close()
        truth_docstore.close()


def record(
    summary: FaultSummary, ops: list[Op], windows: list[FaultWindow], processes: int
) -> None:
    """Add the calls to the summary, their latency filed under the fault active meanwhile."""
    summary.add_operations(len(ops))
    for op in ops:
        kind = next(
            (w.kind for w in windows if w.start <= op.end and op.start <= w.end), "no fault"
        )
        summary.add_latencies(f"checker ({processes} processes), {kind}", [op.end - op.start])
