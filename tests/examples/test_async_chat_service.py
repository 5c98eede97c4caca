"""examples/async_chat_service.py: an HTTP service on AsyncSessionStore that survives kill -9.

In-process: the FastAPI app on the plugin's `async_session_store` (memory +
fakeredis), driven through httpx's ASGI transport.

As a real process: uvicorn serving the example on a free port, driven over
HTTP by an httpx client with several conversations at once. The test kills it
with SIGKILL (once idle, once with a request sent and unanswered), deletes
this test's keys from Redis (its own key prefix, nothing else), starts it
again, retries the request that may have been lost and reads every
conversation back, complete and in order, each message exactly once. Redis
must outlive the service for that, so it is a real server: the one of
REDIS_URL, else a `redis-server` this test starts (skipped without one,
except under CI); PostgreSQL is the real server or the embedded one.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import httpx
import pytest
import redis

from session import AsyncSessionStore
from session.pytest_plugin import drop_postgres_tables

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "async_chat_service.py"
SERVER_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL", "DOCSTORE_TABLE", "REDIS_URL")
CONVERSATIONS = 4
TURNS = 3


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async_chat_service = load(EXAMPLE, "async_chat_service_example")
# The fault suite's private redis-server processes (started and killed by pid).
fault_redis = load(ROOT / "tests" / "faults" / "fault_redis.py", "fault_redis_for_examples")


def turn(number: int) -> list[dict[str, Any]]:
    """Return the two messages one chat turn adds (echo bot), seq numbers included."""
    text = f"turn {number}"
    return [
        {"seq": 2 * number - 1, "role": "user", "content": text},
        {"seq": 2 * number, "role": "assistant", "content": f"echo: {text}"},
    ]


def expected_history(turns: int) -> list[dict[str, Any]]:
    return [message for number in range(1, turns + 1) for message in turn(number)]


# --------------------------------------------------------------------------- in-process


@pytest.fixture
def client(async_session_store: AsyncSessionStore) -> httpx.AsyncClient:
    app = async_chat_service.create_app(async_session_store)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://chat")


@pytest.mark.no_real_servers
@pytest.mark.asyncio
async def test_a_conversation_over_http(client: httpx.AsyncClient) -> None:
    async with client:
        first = (await client.post("/chat", json={"text": "turn 1", "user_id": "u"})).json()
        session_id = first["session_id"]
        second = await client.post("/chat", json={"session_id": session_id, "text": "turn 2"})
        assert second.status_code == 200
        assert second.json()["reply"] == "echo: turn 2"
        assert second.json()["history"] == expected_history(2)
        got = await client.get(f"/sessions/{session_id}/history")
        assert got.json() == {"session_id": session_id, "history": expected_history(2)}


@pytest.mark.no_real_servers
@pytest.mark.asyncio
async def test_a_retried_request_is_not_added_twice(client: httpx.AsyncClient) -> None:
    async with client:
        body = {"text": "turn 1", "request_id": "r1"}
        first = (await client.post("/chat", json=body)).json()
        again = await client.post("/chat", json={**body, "session_id": first["session_id"]})
        assert again.json() == first
        assert first["history"] == expected_history(1)


@pytest.mark.no_real_servers
@pytest.mark.asyncio
async def test_bad_requests_get_http_errors(client: httpx.AsyncClient) -> None:
    async with client:
        assert (await client.post("/chat", json={"session_id": "x"})).status_code == 422
        assert (await client.post("/chat", json={"text": 5})).status_code == 422
        # The store's own validation: a NUL is not storable.
        assert (await client.post("/chat", json={"text": "a\u0000b"})).status_code == 422
        assert (await client.get("/sessions/nope/history")).status_code == 404
        # A session that does not exist (any more) starts a new conversation.
        new = (await client.post("/chat", json={"session_id": "gone", "text": "hi"})).json()
        assert new["session_id"] != "gone" and len(new["history"]) == 2


# --------------------------------------------------------------------------- a real process


@dataclass
class Servers:
    """Where the service keeps its sessions: PostgreSQL, its table, Redis, its key prefix."""

    dsn: str
    table: str
    redis_url: str
    prefix: str

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
        env.update(
            POSTGRES_CONNECTION_STRING=self.dsn, DOCSTORE_TABLE=self.table, REDIS_URL=self.redis_url
        )
        return env

    def flush_cache(self) -> int:
        """Delete this test's keys (its own prefix, never anything else); return how many."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            return int(client.delete(*keys)) if keys else 0
        finally:
            client.close()


def redis_server_or_skip() -> None:
    if fault_redis.redis_server_path() is not None:
        return
    if os.environ.get("CI"):
        pytest.fail("CI is set but redis-server is not on PATH: the restart test must run")
    pytest.skip(
        "REDIS_URL is not set and redis-server is not on PATH: the restarted service needs a "
        "Redis that outlives it (apt-get install redis-server)"
    )


@pytest.fixture(
    params=[
        pytest.param("embedded+redis-server", marks=pytest.mark.embedded),
        pytest.param("real", marks=(pytest.mark.postgres, pytest.mark.redis)),
    ]
)
def servers(
    request: pytest.FixtureRequest, postgres_table: str, session_key_prefix: str, tmp_path: Path
) -> Iterator[Servers]:
    redis_process = None
    if request.param == "real":
        dsn: str = request.getfixturevalue("postgres_url")
        redis_url: str = request.getfixturevalue("redis_server_url")
    else:
        redis_server_or_skip()
        dsn = request.getfixturevalue("embedded_dsn")
        redis_process = fault_redis.RedisProcess(tmp_path / "redis").start()
        redis_url = redis_process.url
    servers = Servers(dsn, postgres_table, redis_url, session_key_prefix)
    try:
        yield servers
    finally:
        try:
            servers.flush_cache()
        finally:
            if redis_process is not None:
                redis_process.stop()
            drop_postgres_tables(dsn, [postgres_table])


class ServiceProcess:
    """The example under uvicorn, as a subprocess on a port of its own."""

    def __init__(self, servers: Servers, port: int, stderr: IO[str]) -> None:
        self.base_url = f"http://127.0.0.1:{port}"
        self.port = port
        self._process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--port", str(port), "--key-prefix", servers.prefix],
            env=servers.env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        self._wait_until_healthy()

    def _wait_until_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._process.poll() is not None:
                pytest.fail(f"the service exited with {self._process.returncode} while starting")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the service did not answer /health within {timeout} s")
            time.sleep(0.05)  # polling a process that is starting, with a deadline

    def send_without_reading(self, path: str, body: bytes) -> None:
        """Send one POST and leave before the answer (a client whose connection broke)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as conn:
            head = (
                f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\n\r\n"
            )
            conn.sendall(head.encode() + body)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; whatever was in flight is cut off."""
        self._process.send_signal(signal.SIGKILL)
        self._process.wait(timeout=30)


async def ok(response: Any) -> dict[str, Any]:
    answer = await response
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def start_conversations(base_url: str) -> list[str]:
    """Run CONVERSATIONS conversations of TURNS turns at once; return their session ids."""

    async def conversation(client: httpx.AsyncClient, number: int) -> str:
        first = await ok(
            client.post(
                "/chat", json={"text": "turn 1", "user_id": f"u{number}", "request_id": "r1"}
            )
        )
        session_id: str = first["session_id"]
        for turn_number in range(2, TURNS + 1):
            body = {"session_id": session_id, "text": f"turn {turn_number}"}
            answer = await ok(client.post("/chat", json={**body, "request_id": f"r{turn_number}"}))
            assert answer["history"] == expected_history(turn_number)
        return session_id

    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        return list(await asyncio.gather(*(conversation(client, n) for n in range(CONVERSATIONS))))


async def histories(base_url: str, ids: list[str]) -> list[list[dict[str, Any]]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        answers = await asyncio.gather(
            *(ok(client.get(f"/sessions/{session_id}/history")) for session_id in ids)
        )
    return [answer["history"] for answer in answers]


def test_killed_and_restarted_service_gets_every_conversation_back(
    servers: Servers, tmp_path: Path
) -> None:
    port = fault_redis.free_port()
    with (tmp_path / "stderr.txt").open("w") as stderr:
        service = ServiceProcess(servers, port, stderr)
        try:
            ids = asyncio.run(start_conversations(service.base_url))
        finally:
            service.kill()  # idle
        assert servers.flush_cache() > 0  # the service did cache in the shared Redis

        service = ServiceProcess(servers, port, stderr)
        try:
            got = asyncio.run(histories(service.base_url, ids))
            assert got == [expected_history(TURNS)] * CONVERSATIONS
            lost = {"session_id": ids[1], "text": f"turn {TURNS + 1}", "request_id": "lost"}
            service.send_without_reading("/chat", httpx.Request("POST", "/", json=lost).content)
        finally:
            service.kill()  # in the middle of that request, or just before or after it
        servers.flush_cache()

        service = ServiceProcess(servers, port, stderr)
        try:
            # The client never got an answer: it retries, and the turn is there once.
            retried = httpx.post(f"{service.base_url}/chat", json=lost, timeout=30)
            assert retried.json()["history"] == expected_history(TURNS + 1)
            got = asyncio.run(histories(service.base_url, ids))
        finally:
            service.kill()
    expected = [expected_history(TURNS + 1 if i == 1 else TURNS) for i in range(CONVERSATIONS)]
    assert got == expected
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()
