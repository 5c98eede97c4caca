"""`python -m session demo`, run as a user runs it: a subprocess that restarts itself.

On the embedded defaults the demo gets no server variables, only
`DOCSTORE_DATA_DIR` pointing at the test session's embedded server (so it
does not touch the user's data directory); on the real servers it gets
POSTGRES_CONNECTION_STRING and REDIS_URL.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from docstore import PostgresDocumentStore
from session import SessionStore
from session.cli import EXIT_FAILED, main
from session.demo import recover
from session.pytest_plugin import drop_postgres_tables

SERVER_VARIABLES = (
    "POSTGRES_CONNECTION_STRING",
    "DATABASE_URL",
    "DOCSTORE_TABLE",
    "REDIS_URL",
    "SESSION_KEY_PREFIX",
)
# A session id: 32 random bytes, URL-safe base64 without padding.
STEP_LINE = re.compile(r"^  (\S.{33}) .*\[(.*)\]$", re.MULTILINE)
SESSION_ID = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


def run_demo(env: dict[str, str]) -> str:
    completed = subprocess.run(
        [sys.executable, "-m", "session", "demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output
    return output


def counters_by_step(output: str) -> dict[str, dict[str, int]]:
    """Return the counters printed for each step (a repeated title: the last one)."""
    steps: dict[str, dict[str, int]] = {}
    for title, counters in STEP_LINE.findall(output):
        steps[title.strip()] = {
            name: int(value) for name, value in (pair.split() for pair in counters.split(", "))
        }
    return steps


def assert_a_good_run(output: str) -> None:
    assert "recovered 5 sessions and 100 messages, intact and in order" in output
    assert "restarted process exited 0" in output
    steps = counters_by_step(output)
    # The restarted process's first read came from PostgreSQL, its second from Redis.
    cold = steps["read 1 (cold: from PostgreSQL)"]
    assert cold["misses"] == 5 and cold["message_misses"] == 5 and cold["message_hits"] == 0
    hot = steps["read 2 (hot: Redis only)"]  # the restarted process's: the last such line
    assert hot["misses"] == 0 and hot["message_misses"] == 0 and hot["message_hits"] == 5
    assert all(step["cache_errors"] == 0 for step in steps.values())
    assert "demo OK" in output
    assert "PROBLEM" not in output
    assert not SESSION_ID.search(output), "the demo must show short hashes, never session ids"


def server_free_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}


@pytest.mark.embedded
def test_demo_on_the_embedded_defaults(embedded_dsn: str, embedded_data_dir: Path) -> None:
    env = server_free_env() | {"DOCSTORE_DATA_DIR": str(embedded_data_dir)}
    output = run_demo(env)
    assert "embedded PostgreSQL" in output and "in-process fakeredis" in output
    assert_a_good_run(output)


@pytest.mark.postgres
@pytest.mark.redis
def test_demo_on_real_servers(
    real_dsn: str,
    redis_server_url: str,
    real_redis: redis.Redis,
    session_key_prefix: str,
    postgres_table: str,
) -> None:
    # Its own table and key prefix (`real_redis` deletes what is under the prefix
    # afterwards): never the defaults, which other users of these shared servers hold.
    env = server_free_env() | {
        "POSTGRES_CONNECTION_STRING": real_dsn,
        "DOCSTORE_TABLE": postgres_table,
        "REDIS_URL": redis_server_url,
        "SESSION_KEY_PREFIX": session_key_prefix,
    }
    # Another application's keys under the same prefix survive the demo's fences.
    foreign = {
        f"{session_key_prefix}important": b"keep me",
        f"{session_key_prefix}{{x}}": b"me too",
    }
    real_redis.mset(foreign)
    try:
        output = run_demo(env)
    finally:
        drop_postgres_tables(real_dsn, [postgres_table])
    assert "(from POSTGRES_CONNECTION_STRING)" in output and "(from REDIS_URL)" in output
    assert_a_good_run(output)
    assert real_redis.mget(list(foreign)) == list(foreign.values())
    assert "is shared with something" in output  # the demo's store warned about them


@pytest.mark.embedded
def test_recovery_reports_a_conversation_that_differs(
    embedded_dsn: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", embedded_dsn)
    with SessionStore(PostgresDocumentStore(embedded_dsn), owns_docstore=True) as store:
        created = store.create_session("u", {"a": 1})
        message = store.add_message(created.id, "user", "what was said", message_id="m1")
        session = store.get_session(created.id)
        assert session is not None
        try:
            record = {
                "id": created.id,
                "user_id": "u",
                "data": {"a": 1},
                "version": session.version,
                "created_at": session.created_at.isoformat(),
                "messages": [
                    {"seq": 1, "id": message.id, "role": "user", "content": "what was said"}
                ],
            }
            path = tmp_path / "expected.json"
            path.write_text(json.dumps({"run": "t", "sessions": [record]}))
            assert recover(str(path)) == 0
            record["messages"][0]["content"] = "something else"  # type: ignore[index]
            path.write_text(json.dumps({"run": "t", "sessions": [record]}))
            assert main(["demo", "--recover", str(path)]) == EXIT_FAILED
            out = capsys.readouterr().out
            assert "PROBLEM" in out and "recovered differently" in out
            assert created.id not in out
        finally:
            store.delete_session(created.id)
