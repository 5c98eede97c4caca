"""The asyncio fixtures of `session.pytest_plugin`, under each runner a project may use.

A project runs its async tests with pytest-asyncio (strict mode: marked
tests; auto mode: every async test) or with anyio's plugin
(`@pytest.mark.anyio`). The fixtures must be set up, used and torn down in
the loop of the test in each case: the inner runs below (`pytester`) check
all three, with the real servers too, whose asyncio clients (asyncpg,
redis.asyncio) fail on a loop they were not opened in.
"""

from __future__ import annotations

import json
import textwrap
import uuid

import psycopg2
import pytest
import redis
import redis.asyncio

from docstore import AsyncMemoryDocumentStore
from session import AsyncSessionStore

pytest_plugins = ["pytester"]

ASYNCIO_SCOPE = ("-o", "asyncio_default_fixture_loop_scope=function")

# How a test file is written for each runner: the options of the run, the
# decorator of an async test, and what the file must define.
RUNNERS = {
    "asyncio-strict": (("-o", "asyncio_mode=strict"), "@pytest.mark.asyncio", ""),
    "asyncio-auto": (("-o", "asyncio_mode=auto"), "", ""),
    "anyio": (
        ("-o", "asyncio_mode=strict"),
        "@pytest.mark.anyio",
        """
        @pytest.fixture
        def anyio_backend():
            return "asyncio"
        """,
    ),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def round_trip(store: AsyncSessionStore) -> str:
    created = await store.create_session("alice", {"cart": [1]})
    await store.add_message(created.id, "user", "hello")
    first = await store.get_session(created.id)
    assert first is not None and first.version == 2
    assert await store.get_session(created.id) == first
    assert [m.content for m in await store.get_messages(created.id)] == ["hello"]
    return created.id


@pytest.mark.no_real_servers
@pytest.mark.asyncio
async def test_async_session_store_under_pytest_asyncio(
    async_session_store: AsyncSessionStore,
    async_docstore_memory: AsyncMemoryDocumentStore,
    async_fake_redis: redis.asyncio.Redis,
) -> None:
    session_id = await round_trip(async_session_store)
    assert async_session_store.stats()["hits"] >= 1
    # Built on the other two fixtures: the documents in one, the copies in the other.
    assert await async_docstore_memory.count("sessions") == 1
    keys = [key async for key in async_fake_redis.scan_iter()]
    assert any(session_id.encode() in key for key in keys)


@pytest.mark.no_real_servers
@pytest.mark.anyio
async def test_async_session_store_under_anyio(
    async_session_store: AsyncSessionStore, async_fake_redis: redis.asyncio.Redis
) -> None:
    session_id = await round_trip(async_session_store)
    keys = [key async for key in async_fake_redis.scan_iter()]
    assert any(session_id.encode() in key for key in keys)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.asyncio
async def test_async_real_session_store(
    async_real_session_store: AsyncSessionStore,
    async_real_redis: redis.asyncio.Redis,
    session_key_prefix: str,
) -> None:
    await round_trip(async_real_session_store)
    assert [key async for key in async_real_redis.scan_iter(match=f"{session_key_prefix}*")]


# --------------------------------------------------------------------------- pytester


def inner_file(runner: str, body: str) -> str:
    """Return a test file for `runner`: `body` with `{mark}` put before each async test."""
    _, mark, header = RUNNERS[runner]
    return (
        "import json\n\nimport pytest\n\n"
        + textwrap.dedent(header)
        + textwrap.dedent(body).replace("{mark}", mark)
    )


def run_inner(pytester: pytest.Pytester, runner: str, *extra: str) -> pytest.RunResult:
    options, _, _ = RUNNERS[runner]
    return pytester.runpytest(
        "-W", "error", "-p", "no:cacheprovider", *ASYNCIO_SCOPE, *options, *extra
    )


INNER_IN_PROCESS = """
    {mark}
    async def test_inner(async_session_store, async_fake_redis, async_docstore_memory):
        created = await async_session_store.create_session("u", {"a": 1})
        assert await async_session_store.get_session(created.id) == created
        assert await async_fake_redis.dbsize() > 0


    @pytest.mark.parametrize("number", range(3))
    {mark}
    async def test_each_test_gets_its_own(async_session_store, async_fake_redis, number):
        assert await async_fake_redis.dbsize() == 0  # nothing the test before left behind
        assert await async_session_store.list_sessions("u") == []
        await async_session_store.create_session("u")
        await async_fake_redis.set("left-behind", b"1")
"""


@pytest.mark.no_real_servers
@pytest.mark.parametrize("runner", RUNNERS)
def test_async_fixtures_under_each_runner(pytester: pytest.Pytester, runner: str) -> None:
    pytester.makepyfile(test_inner=inner_file(runner, INNER_IN_PROCESS))
    result = run_inner(pytester, runner)
    result.assert_outcomes(passed=4)


INNER_REAL_SERVERS = """
    {mark}
    async def test_inner(
        async_real_session_store, async_real_redis, session_key_prefix, postgres_table
    ):
        created = await async_real_session_store.create_session("u", {"a": 1})
        await async_real_session_store.add_message(created.id, "user", "hi")
        assert (await async_real_session_store.get_session(created.id)).version == 2
        await async_real_redis.set(f"{session_key_prefix}mine", b"1")
        with open("seen.json", "w") as out:
            json.dump({"prefix": session_key_prefix, "table": postgres_table}, out)
"""


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("runner", RUNNERS)
def test_real_async_fixtures_clean_up_only_what_they_made(
    pytester: pytest.Pytester, real_dsn: str, redis_url: str, runner: str
) -> None:
    outsider = f"outsider-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(outsider, b"keep", ex=60)
        pytester.makepyfile(test_inner=inner_file(runner, INNER_REAL_SERVERS))
        # Torn down in another loop than the test's, asyncpg and redis.asyncio would fail.
        run_inner(pytester, runner).assert_outcomes(passed=1)
        seen = json.loads((pytester.path / "seen.json").read_text())
        assert not list(client.scan_iter(match=f"{seen['prefix']}*"))
        assert client.get(outsider) == b"keep"
    finally:
        client.delete(outsider)
        client.close()
    conn = psycopg2.connect(real_dsn, connect_timeout=10)
    try:
        with conn.cursor() as cur:
            for table in (seen["table"], f"{seen['table']}_meta"):
                cur.execute("SELECT to_regclass(%s)", (table,))
                assert cur.fetchone() == (None,), f"{table} was left behind"
    finally:
        conn.close()


INNER_ANYIO_ELSEWHERE = """
    import pytest


    @pytest.fixture(params=["trio", "asyncio"])
    def anyio_backend(request):
        return request.param


    @pytest.mark.anyio
    async def test_inner(async_session_store):
        pass
"""


@pytest.mark.no_real_servers
def test_anyio_tests_the_fixtures_cannot_serve_fail_with_the_reason(
    pytester: pytest.Pytester,
) -> None:
    # Rather than hand out a store whose connections belong to another loop than the test's.
    pytester.makepyfile(test_inner=textwrap.dedent(INNER_ANYIO_ELSEWHERE))
    result = pytester.runpytest(
        "-W", "error", "-p", "no:cacheprovider", *ASYNCIO_SCOPE, "-o", "asyncio_mode=auto"
    )
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*async_session_store needs anyio's asyncio backend, not 'trio'*",
            "*async_session_store in an anyio test needs pytest-asyncio in strict mode*",
        ],
        consecutive=False,
    )


INNER_NEEDS_SERVERS = """
    {mark}
    async def test_needs_postgres(async_postgres_docstore):
        pass


    {mark}
    async def test_needs_redis(async_real_redis):
        pass
"""


@pytest.mark.no_real_servers
def test_missing_servers_skip_the_async_real_fixtures(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same rule as the sync fixtures' (server_url): under CI this would fail instead.
    for variable in ("POSTGRES_CONNECTION_STRING", "REDIS_URL", "CI"):
        monkeypatch.delenv(variable, raising=False)
    pytester.makepyfile(test_inner=inner_file("asyncio-strict", INNER_NEEDS_SERVERS))
    result = run_inner(pytester, "asyncio-strict", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(
        ["*POSTGRES_CONNECTION_STRING is not set*", "*REDIS_URL is not set*"]
    )
