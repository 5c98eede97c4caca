"""examples/chat_service.py: the same code on every backend, conversations intact across restarts.

In-process: the service on a memory docstore + fakeredis, on the embedded
PostgreSQL + fakeredis, and on the real PostgreSQL + Redis; a restart is a new
SessionStore whose cache was flushed (a fresh fakeredis server, or this
test's keys deleted from the real Redis).

As a real process: the script serves JSON lines; the test SIGKILLs it (once
idle, once in the middle of a request), flushes the cache, starts it again,
retries the request that may have been lost and reads every conversation
back, intact and in order, each message exactly once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import fakeredis
import pytest
import redis
from postgres_tables import drop_tables, postgres_store_factory, unique_table

from docstore import DocumentStore, MemoryDocumentStore
from session import SessionStore, get_session_store
from session.config import redis_client_from_url
from session.pytest_plugin import unique_key_prefix

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "chat_service.py"
SERVER_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL", "DOCSTORE_TABLE", "REDIS_URL")
CONVERSATIONS = 3
TURNS = 4


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chat_service_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


chat_service = load_example()


def delete_keys(client: redis.Redis, prefix: str) -> None:
    """Flush the cache of this test only: the keys under its own prefix."""
    keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
    if keys:
        client.delete(*keys)


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


class Backend:
    """A docstore plus a way to get a cache as a freshly restarted process would see it."""

    def __init__(
        self, documents: DocumentStore, restarted_cache: Callable[[], redis.Redis], prefix: str
    ) -> None:
        self.documents = documents
        self.restarted_cache = restarted_cache
        self.prefix = prefix

    def service(self) -> tuple[Any, SessionStore]:
        store = SessionStore(self.documents, self.restarted_cache(), key_prefix=self.prefix)
        return chat_service.ChatService(store), store


@contextmanager
def fake_caches() -> Iterator[Callable[[], redis.Redis]]:
    clients: list[redis.Redis] = []

    def restarted() -> redis.Redis:
        client = fakeredis.FakeRedis(server=fakeredis.FakeServer())  # an empty cache
        clients.append(client)
        return client

    yield restarted
    for client in clients:
        client.close()


REAL_SERVERS = (pytest.mark.postgres, pytest.mark.redis)


@pytest.fixture(
    params=[
        "memory",
        pytest.param("embedded", marks=pytest.mark.embedded),
        pytest.param("real", marks=REAL_SERVERS),
    ]
)
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    prefix = unique_key_prefix()
    if request.param == "memory":
        with fake_caches() as caches:
            yield Backend(MemoryDocumentStore(), caches, prefix)
        return
    if request.param == "embedded":
        dsn: str = request.getfixturevalue("embedded_dsn")
        with postgres_store_factory(dsn) as make, fake_caches() as caches:
            yield Backend(make(), caches, prefix)
        return
    real_dsn: str = request.getfixturevalue("real_dsn")
    redis_url: str = request.getfixturevalue("redis_url")
    client = redis_client_from_url(redis_url)

    def flushed() -> redis.Redis:
        delete_keys(client, prefix)
        return client

    try:
        with postgres_store_factory(real_dsn) as make:
            yield Backend(make(), flushed, prefix)
    finally:
        delete_keys(client, prefix)
        client.close()


def test_conversations_survive_a_restart_with_an_empty_cache(backend: Backend) -> None:
    service, store = backend.service()
    ids = []
    for conversation in range(CONVERSATIONS):
        response = service.chat(None, "turn 1", user_id=f"user-{conversation}")
        ids.append(response["session_id"])
        for number in range(2, TURNS + 1):
            response = service.chat(ids[-1], f"turn {number}")
            assert response["session_id"] == ids[-1]
            assert response["reply"] == f"echo: turn {number}"
        assert response["history"] == expected_history(TURNS)
    store.close()

    service, store = backend.service()  # restarted: nothing cached
    for session_id in ids:
        assert service.history(session_id)["history"] == expected_history(TURNS)
    assert store.stats()["misses"] == CONVERSATIONS
    response = service.chat(ids[0], f"turn {TURNS + 1}")
    assert response["history"] == expected_history(TURNS + 1)
    for session_id in ids:  # again, from the cache this time
        expected = expected_history(TURNS + 1 if session_id == ids[0] else TURNS)
        assert service.history(session_id)["history"] == expected
    assert store.stats()["message_hits"] >= CONVERSATIONS
    store.close()


def test_a_retried_request_is_not_added_twice(backend: Backend) -> None:
    service, store = backend.service()
    first = service.chat(None, "turn 1", user_id="u", request_id="r1")
    again = service.chat(first["session_id"], "turn 1", request_id="r1")
    assert again == first
    assert service.chat(first["session_id"], "turn 2", request_id="r2")["history"] == (
        expected_history(2)
    )
    store.close()


def test_handle_answers_bad_requests_with_errors(backend: Backend) -> None:
    service, store = backend.service()
    assert "error" in service.handle(["not", "an", "object"])
    assert "error" in service.handle({"op": "chat"})
    assert "error" in service.handle({"op": "chat", "text": "x", "request_id": 5})
    assert "error" in service.handle({"op": "history"})
    assert "error" in service.handle({"op": "shout", "text": "x"})
    assert "error" in service.handle({"op": "chat", "text": "x", "user_id": 7})
    new = service.handle({"op": "chat", "session_id": "gone", "text": "hi"})
    assert new["session_id"] != "gone" and len(new["history"]) == 2
    store.close()


# --------------------------------------------------------------------------- a real process


class ChatProcess:
    """examples/chat_service.py as a subprocess: JSON lines in, JSON lines out."""

    def __init__(self, env: dict[str, str], prefix: str, stderr: IO[str]) -> None:
        self._process = subprocess.Popen(
            [sys.executable, str(EXAMPLE), "--key-prefix", prefix],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.put(line)

    def send(self, request: dict[str, Any]) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()

    def request(self, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        self.send(request)
        try:
            response: dict[str, Any] = json.loads(self._lines.get(timeout=timeout))
        except queue.Empty:
            pytest.fail(f"no response to {request} within {timeout} s")
        assert "error" not in response, response
        return response

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, whatever was in flight is cut off."""
        self._process.kill()
        self._process.wait(timeout=30)
        self._reader.join(timeout=30)
        for pipe in (self._process.stdin, self._process.stdout):
            if pipe is not None:
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass


@pytest.fixture(
    params=[
        pytest.param("embedded+fakeredis", marks=pytest.mark.embedded),
        pytest.param("real", marks=REAL_SERVERS),
    ]
)
def process_backend(
    request: pytest.FixtureRequest,
) -> Iterator[tuple[dict[str, str], Callable[[], None], str]]:
    """Yield (env of the service, flush its cache, its key prefix)."""
    prefix = unique_key_prefix()
    env = {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}
    if request.param == "embedded+fakeredis":
        env["POSTGRES_CONNECTION_STRING"] = request.getfixturevalue("embedded_dsn")
        # The in-process fakeredis dies with the process: a restart starts empty.
        yield env, lambda: None, prefix
        return
    env["POSTGRES_CONNECTION_STRING"] = request.getfixturevalue("real_dsn")
    # A table of its own on the shared server, never its default one.
    env["DOCSTORE_TABLE"] = unique_table()
    env["REDIS_URL"] = request.getfixturevalue("redis_url")
    client = redis_client_from_url(env["REDIS_URL"])
    try:
        yield env, lambda: delete_keys(client, prefix), prefix
    finally:
        delete_keys(client, prefix)
        client.close()
        drop_tables(env["POSTGRES_CONNECTION_STRING"], [env["DOCSTORE_TABLE"]])


def test_killed_and_restarted_service_keeps_every_conversation(
    process_backend: tuple[dict[str, str], Callable[[], None], str], tmp_path: Path
) -> None:
    env, flush_cache, prefix = process_backend
    ids: list[str] = []
    stderr = (tmp_path / "stderr.txt").open("w")
    try:
        service = ChatProcess(env, prefix, stderr)
        for conversation in range(CONVERSATIONS):
            response = service.request(
                {"text": "turn 1", "user_id": f"user-{conversation}", "request_id": "r1"}
            )
            ids.append(response["session_id"])
            for number in range(2, TURNS + 1):
                service.request(
                    {"session_id": ids[-1], "text": f"turn {number}", "request_id": f"r{number}"}
                )
        service.kill()  # idle
        flush_cache()

        service = ChatProcess(env, prefix, stderr)
        for session_id in ids:
            got = service.request({"op": "history", "session_id": session_id})
            assert got["history"] == expected_history(TURNS)
        lost = {"session_id": ids[1], "text": f"turn {TURNS + 1}", "request_id": "lost"}
        service.send(lost)
        service.kill()  # in the middle of that request, or just before or after it
        flush_cache()

        service = ChatProcess(env, prefix, stderr)
        retried = service.request(lost)  # the client never got an answer: it retries
        assert retried["history"] == expected_history(TURNS + 1)
        for session_id in ids:
            got = service.request({"op": "history", "session_id": session_id})
            expected = expected_history(TURNS + 1 if session_id == ids[1] else TURNS)
            assert got["history"] == expected
        service.kill()
    finally:
        stderr.close()
        cleanup(env, prefix, ids)
    assert "Traceback" not in (tmp_path / "stderr.txt").read_text()


def cleanup(env: dict[str, str], prefix: str, ids: list[str]) -> None:
    """Delete the sessions the service created (on the embedded server: in its default table)."""
    if "DOCSTORE_TABLE" in env:
        return  # the table is dropped
    with get_session_store(
        docstore_url=env["POSTGRES_CONNECTION_STRING"],
        redis_url=env.get("REDIS_URL", ""),  # "": in-process, even if this process has one
        key_prefix=prefix,
    ) as store:
        for session_id in ids:
            store.delete_session(session_id)
