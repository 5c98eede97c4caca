"""The fixtures of `session.pytest_plugin`, used the way a project that installs the package would.

The plugin is registered through the `pytest11` entry point, so these tests
request its fixtures without importing anything from it; the `pytester` tests
check that a fresh test file in another directory gets them too.
"""

from __future__ import annotations

import json
import textwrap
import uuid

import psycopg2
import pytest
import redis

from docstore import MemoryDocumentStore, PostgresDocumentStore
from session import SessionStore

pytest_plugins = ["pytester"]


# What a project using pytest-asyncio sets (the test extra installs it; unset,
# pytest-asyncio warns, and -W error would fail the inner run).
ASYNCIO_SCOPE = ("-o", "asyncio_default_fixture_loop_scope=function")


def test_session_store_round_trip(session_store: SessionStore) -> None:
    created = session_store.create_session("alice", {"cart": [1]})
    session_store.add_message(created.id, "user", "hello")
    assert session_store.get_session(created.id) == session_store.get_session(created.id)
    assert [m.content for m in session_store.get_messages(created.id)] == ["hello"]
    assert session_store.stats()["hits"] >= 1


def test_session_store_is_built_on_the_other_fixtures(
    session_store: SessionStore, docstore_memory: MemoryDocumentStore, fake_redis: redis.Redis
) -> None:
    created = session_store.create_session("bob")
    assert session_store.get_session(created.id) is not None
    assert docstore_memory.read("sessions", created.id) is not None
    assert any(created.id.encode() in key for key in fake_redis.scan_iter())


def test_fake_redis_starts_empty_each_test(fake_redis: redis.Redis) -> None:
    assert fake_redis.dbsize() == 0
    fake_redis.set("left-behind", b"1")  # the next test's server must not see it


def test_fake_redis_starts_empty_again(fake_redis: redis.Redis) -> None:
    assert fake_redis.dbsize() == 0


def test_session_key_prefix_is_unique(session_key_prefix: str) -> None:
    assert session_key_prefix.endswith(":")
    assert "{" not in session_key_prefix


@pytest.mark.postgres
def test_postgres_docstore(postgres_docstore: PostgresDocumentStore) -> None:
    doc = postgres_docstore.create("things", {"a": 1})
    assert postgres_docstore.read("things", doc.id) == doc


@pytest.mark.postgres
@pytest.mark.redis
def test_real_session_store(
    real_session_store: SessionStore, real_redis: redis.Redis, session_key_prefix: str
) -> None:
    created = real_session_store.create_session("carol", {"n": 1})
    for number in range(3):
        real_session_store.add_message(created.id, "user", f"m{number}")
    cold = real_session_store.get_session(created.id)
    assert cold is not None and cold.version == 4 and cold.data == {"n": 1}
    assert real_session_store.get_session(created.id) == cold
    assert [m.seq for m in real_session_store.get_messages(created.id)] == [1, 2, 3]
    assert list(real_redis.scan_iter(match=f"{session_key_prefix}*"))


# --------------------------------------------------------------------------- pytester

INNER_IN_PROCESS = """
    def test_inner(session_store, fake_redis, docstore_memory):
        created = session_store.create_session("u", {"a": 1})
        assert session_store.get_session(created.id) == created
        assert fake_redis.dbsize() > 0
"""


def test_a_fresh_test_file_gets_the_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_IN_PROCESS))
    # A subprocess: the fixtures must come from the installed entry point alone.
    result = pytester.runpytest_subprocess("-W", "error", "-p", "no:cacheprovider", *ASYNCIO_SCOPE)
    result.assert_outcomes(passed=1)


INNER_REAL_SERVERS = """
    import json


    def test_inner(real_session_store, real_redis, session_key_prefix, postgres_table):
        created = real_session_store.create_session("u", {"a": 1})
        real_session_store.add_message(created.id, "user", "hi")
        assert real_session_store.get_session(created.id).version == 2
        real_redis.set(f"{session_key_prefix}mine", b"1")
        with open("seen.json", "w") as out:
            json.dump({"prefix": session_key_prefix, "table": postgres_table}, out)
"""


@pytest.mark.postgres
@pytest.mark.redis
def test_real_fixtures_clean_up_only_what_they_made(
    pytester: pytest.Pytester, real_dsn: str, redis_url: str
) -> None:
    outsider = f"outsider-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(outsider, b"keep", ex=60)
        pytester.makepyfile(test_inner=textwrap.dedent(INNER_REAL_SERVERS))
        result = pytester.runpytest_subprocess(
            "-W", "error", "-p", "no:cacheprovider", *ASYNCIO_SCOPE
        )
        result.assert_outcomes(passed=1)
        seen = json.loads((pytester.path / "seen.json").read_text())
        assert not list(client.scan_iter(match=f"{seen['prefix']}*"))
        assert client.get(outsider) == b"keep"
    finally:
        client.delete(outsider)
        client.close()
    conn = psycopg2.connect(real_dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (seen["table"],))
            assert cur.fetchone() == (None,)
    finally:
        conn.close()


INNER_NEEDS_SERVERS = """
    def test_needs_postgres(postgres_docstore):
        pass


    def test_needs_redis(real_redis):
        pass
"""


@pytest.mark.parametrize("ci", [False, True], ids=["local", "ci"])
def test_missing_servers_skip_locally_and_fail_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: bool
) -> None:
    for variable in ("POSTGRES_CONNECTION_STRING", "REDIS_URL", "CI"):
        monkeypatch.delenv(variable, raising=False)
    if ci:
        monkeypatch.setenv("CI", "true")
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_NEEDS_SERVERS))
    result = pytester.runpytest("-W", "error", "-p", "no:cacheprovider", "-rs", *ASYNCIO_SCOPE)
    if ci:
        result.assert_outcomes(errors=2)
        result.stdout.fnmatch_lines(["*CI is set but POSTGRES_CONNECTION_STRING is not*"])
    else:
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines(["*REDIS_URL is not set*"])
