"""The framework adapters against each framework's own backends, on the same servers.

Usage: pip install -e '.[peers]' && python bench/peers_bench.py [--rounds 200] [--blocks 5]

Talks to the servers named by POSTGRES_CONNECTION_STRING and REDIS_URL (by
default the local ones below). Every contestant keeps its data in tables,
files and keys of its own (fresh names), all removed at the end.

What is timed, per contestant, at conversation depth 10 and 1,000:

- conversations (Agents SDK sessions, LangChain histories): one turn = add
  one message, then read the last 20 (the Agents SDK: `add_items([item])`,
  `get_items(20)`; LangChain: `add_messages([m])`, `messages[-20:]`, since a
  history has no way to read less than everything). At depth 10 each round
  uses the next of 50 conversations of 10 messages (they grow to 14); at
  depth 1,000 every round uses one conversation (it grows to 1,000 + rounds).
- Django: one request's worth of session work: load an existing session,
  change a key, save (`session.contrib.django` against `cached_db` with its
  database on the same PostgreSQL and its cache on the same Redis).

Contestants run in alternating blocks, so drift on the machine hits all of
them alike; each figure is the median of its per-operation latencies, and
each ratio is ours / theirs (below 1: ours is faster). A peer that cannot be
installed or run here is reported as such, with the reason.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlparse

import psycopg2
import redis
from psycopg2 import sql

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from docstore import PostgresDocumentStore  # noqa: E402
from session import SessionStore  # noqa: E402
from session.config import redis_client_from_url  # noqa: E402

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
RUN = uuid.uuid4().hex[:10]
TEXT = "A message of about a hundred characters, like a short chat turn between a user and a bot."
SHALLOW_CONVERSATIONS = 50
READ_LAST = 20

Turn = Callable[[int], Awaitable[None]]


@dataclass
class Contestant:
    """One backend of one framework: how to fill a conversation and how to run a turn."""

    name: str
    prepare: Callable[[int, int], Awaitable[list[Turn]]]  # (conversations, depth) -> turns
    cleanup: Callable[[], Awaitable[None]]
    durations: dict[int, list[float]] = field(default_factory=dict)
    failure: str | None = None


@dataclass
class Servers:
    dsn: str
    redis_url: str
    tables: list[str] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    directories: list[str] = field(default_factory=list)

    def table(self, what: str) -> str:
        name = f"peers_{RUN}_{what}"
        self.tables.append(name)
        return name

    def prefix(self, what: str) -> str:
        name = f"peers:{RUN}:{what}:"
        self.prefixes.append(name)
        return name

    def directory(self) -> str:
        path = tempfile.mkdtemp(prefix="peers_bench_")
        self.directories.append(path)
        return path

    def clean(self) -> None:
        conn = psycopg2.connect(self.dsn, connect_timeout=10)
        conn.autocommit = True
        with conn.cursor() as cur:
            for table in self.tables:
                for name in (table, f"{table}_meta"):
                    cur.execute(
                        sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(sql.Identifier(name))
                    )
            cur.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                    sql.Identifier(f"peers_{RUN}_django")
                )
            )
        conn.close()
        client = redis.Redis.from_url(self.redis_url)
        for prefix in self.prefixes:
            keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
            for start in range(0, len(keys), 1000):
                client.delete(*keys[start : start + 1000])
        client.close()
        for path in self.directories:
            shutil.rmtree(path, ignore_errors=True)


def our_store(servers: Servers, what: str) -> SessionStore:
    return SessionStore(
        PostgresDocumentStore(servers.dsn, table=servers.table(what)),
        redis_client_from_url(servers.redis_url),
        key_prefix=servers.prefix(what),
        owns_docstore=True,
        owns_cache=True,
    )


# --------------------------------------------------------------------------- Agents SDK


def agents_contestants(servers: Servers) -> list[Contestant]:
    from agents.memory import SQLiteSession

    from session.contrib.openai_agents import OpenAIAgentsSession

    def item(n: int) -> dict[str, Any]:
        return {"role": "user" if n % 2 else "assistant", "content": f"{TEXT} {n}"}

    def contestant(name: str, make: Callable[[str], Any], close: Callable[[], Awaitable[None]]):
        async def prepare(conversations: int, depth: int) -> list[Turn]:
            sessions = [make(f"{name}-{depth}-{c}-{RUN}") for c in range(conversations)]
            for session in sessions:
                for start in range(0, depth, 100):
                    await session.add_items(
                        [item(n) for n in range(start, min(depth, start + 100))]
                    )

            async def turn_of(session: Any) -> None:
                await session.add_items([item(0)])
                assert 0 < len(await session.get_items(READ_LAST)) <= READ_LAST

            return [lambda i, s=session: turn_of(s) for session in sessions]

        return Contestant(name, prepare, close)

    ours = our_store(servers, "agents")
    sqlite_path = os.path.join(servers.directory(), "agents.sqlite")
    contestants = [
        contestant(
            "OpenAIAgentsSession", lambda key: OpenAIAgentsSession(key, ours), _closer(ours.close)
        ),
        contestant(
            "SQLiteSession (file)",
            lambda key: SQLiteSession(key, sqlite_path),
            _closer(lambda: None),
        ),
    ]
    try:
        import redis.asyncio as aioredis
        from agents.extensions.memory.redis_session import RedisSession

        client = aioredis.Redis.from_url(servers.redis_url)
        prefix = servers.prefix("agents-redis")
        contestants.append(
            contestant(
                "RedisSession",
                lambda key: RedisSession(key, redis_client=client, key_prefix=prefix),
                client.aclose,
            )
        )
    except ImportError as exc:
        contestants.append(_unavailable("RedisSession", exc))
    try:
        from agents.extensions.memory.sqlalchemy_session import SQLAlchemySession
        from sqlalchemy.ext.asyncio import create_async_engine

        engine = create_async_engine(_sqlalchemy_url(servers.dsn))
        sessions_table, messages_table = servers.table("sa_sessions"), servers.table("sa_messages")

        def make_sa(key: str) -> Any:
            return SQLAlchemySession(
                key,
                engine=engine,
                create_tables=True,
                sessions_table=sessions_table,
                messages_table=messages_table,
            )

        contestants.append(contestant("SQLAlchemySession (PostgreSQL)", make_sa, engine.dispose))
    except ImportError as exc:
        contestants.append(_unavailable("SQLAlchemySession (PostgreSQL)", exc))
    return contestants


def _sqlalchemy_url(dsn: str) -> str:
    parts = urlparse(dsn)
    return f"postgresql+asyncpg://{parts.netloc}{parts.path}"


def _closer(close: Callable[[], Any]) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        close()

    return run


def _unavailable(name: str, reason: BaseException | str) -> Contestant:
    async def nothing(*_: Any) -> list[Turn]:
        return []

    async def no_cleanup() -> None:
        return None

    contestant = Contestant(name, nothing, no_cleanup)
    contestant.failure = reason if isinstance(reason, str) else f"{type(reason).__name__}: {reason}"
    return contestant


# --------------------------------------------------------------------------- LangChain


def langchain_contestants(servers: Servers) -> list[Contestant]:
    from langchain_core.messages import AIMessage, HumanMessage

    from session.contrib.langchain import SessionChatMessageHistory

    def message(n: int) -> Any:
        return (HumanMessage if n % 2 else AIMessage)(content=f"{TEXT} {n}")

    def contestant(name: str, make: Callable[[str], Any], close: Callable[[], Any]) -> Contestant:
        async def prepare(conversations: int, depth: int) -> list[Turn]:
            histories = [make(str(uuid.uuid4())) for _ in range(conversations)]
            for history in histories:
                for start in range(0, depth, 100):
                    history.add_messages(
                        [message(n) for n in range(start, min(depth, start + 100))]
                    )

            async def turn_of(history: Any) -> None:
                history.add_messages([message(0)])
                assert 0 < len(history.messages[-READ_LAST:]) <= READ_LAST

            return [lambda i, h=history: turn_of(h) for history in histories]

        return Contestant(name, prepare, _closer(close))

    ours = our_store(servers, "langchain")
    contestants = [
        contestant(
            "SessionChatMessageHistory",
            lambda key: SessionChatMessageHistory(key, ours),
            ours.close,
        ),
    ]
    try:
        import psycopg
        from langchain_postgres import PostgresChatMessageHistory

        connection = psycopg.connect(servers.dsn, autocommit=True)
        table = servers.table("lc_postgres")
        PostgresChatMessageHistory.create_tables(connection, table)
        contestants.append(
            contestant(
                "langchain-postgres PostgresChatMessageHistory",
                lambda key: PostgresChatMessageHistory(table, key, sync_connection=connection),
                connection.close,
            )
        )
    except ImportError as exc:
        contestants.append(_unavailable("langchain-postgres PostgresChatMessageHistory", exc))
    try:
        from langchain_redis import RedisChatMessageHistory

        prefix = servers.prefix("lc_redis")
        index = f"idx:peers:{RUN}"
        probe = RedisChatMessageHistory(
            "probe", redis_url=servers.redis_url, key_prefix=prefix, index_name=index
        )
        probe.clear()
        client = probe.redis_client
        contestants.append(
            contestant(
                "langchain-redis RedisChatMessageHistory",
                lambda key: RedisChatMessageHistory(
                    key, redis_client=client, key_prefix=prefix, index_name=index
                ),
                lambda: _drop_index(client, index),
            )
        )
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot run here"
        contestants.append(
            _unavailable(
                "langchain-redis RedisChatMessageHistory", f"{type(exc).__name__}: {str(exc)[:160]}"
            )
        )
    return contestants


def _drop_index(client: redis.Redis, index: str) -> None:
    try:
        client.execute_command("FT.DROPINDEX", index)
    except redis.RedisError:
        pass


# --------------------------------------------------------------------------- Django


def django_contestants(servers: Servers) -> list[Contestant]:
    import django
    from django.conf import settings

    # The harness runs every family inside one event loop; Django's sync ORM refuses
    # that unless told the caller knows it is not sharing the loop with anything.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"

    schema = f"peers_{RUN}_django"
    conn = psycopg2.connect(servers.dsn, connect_timeout=10)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    conn.close()
    parts = urlparse(servers.dsn)
    ours = our_store(servers, "django")
    django_prefix = servers.prefix("django-cache")
    settings.configure(
        SECRET_KEY="benchmark only",
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.sessions"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": unquote(parts.path.lstrip("/")) or "test",
                "USER": unquote(parts.username or "postgres"),
                "PASSWORD": unquote(parts.password or ""),
                "HOST": parts.hostname or "127.0.0.1",
                "PORT": str(parts.port or 5432),
                "CONN_MAX_AGE": None,
                "OPTIONS": {"options": f"-c search_path={schema}"},
            }
        },
        CACHES={
            "default": {
                "BACKEND": "django.core.cache.backends.redis.RedisCache",
                "LOCATION": servers.redis_url,
                "KEY_PREFIX": django_prefix,
            }
        },
        SESSION_STORE_FACTORY=lambda: ours,
        LOGGING_CONFIG=None,
    )
    django.setup()
    from django.contrib.sessions.backends.cached_db import SessionStore as CachedDB
    from django.core.management import call_command

    from session.contrib.django import SessionStore as Ours

    call_command("migrate", "sessions", verbosity=0, interactive=False)

    def contestant(name: str, engine: Any, close: Callable[[], Any]) -> Contestant:
        async def prepare(conversations: int, depth: int) -> list[Turn]:
            keys = []
            for c in range(conversations):
                created = engine()
                created.update({"user": f"u{c}", "cart": list(range(10)), "theme": "dark"})
                created.save()
                keys.append(created.session_key)
                engine(created.session_key).load()  # cached now

            async def request(key: str, i: int) -> None:
                loaded = engine(key)
                loaded["counter"] = i
                loaded.save()

            return [lambda i, k=key: request(k, i) for key in keys]

        return Contestant(name, prepare, _closer(close))

    return [
        contestant("session.contrib.django", Ours, ours.close),
        contestant("django cached_db", CachedDB, lambda: None),
    ]


# --------------------------------------------------------------------------- running


async def run_family(
    title: str, contestants: list[Contestant], depths: list[int], rounds: int, blocks: int
) -> None:
    for depth in depths:
        conversations = SHALLOW_CONVERSATIONS if depth < 100 else 1
        turns: dict[str, list[Turn]] = {}
        for contestant in contestants:
            if contestant.failure:
                continue
            try:
                turns[contestant.name] = await contestant.prepare(conversations, depth)
            except Exception as exc:  # noqa: BLE001 - report a peer that fails, keep going
                contestant.failure = f"{type(exc).__name__}: {str(exc)[:160]}"
                traceback.print_exc(limit=2)
        per_block = max(1, rounds // blocks)
        counter = 0
        for _ in range(blocks):
            for contestant in contestants:
                mine = turns.get(contestant.name)
                if not mine:
                    continue
                for _ in range(per_block):
                    turn = mine[counter % len(mine)]
                    started = time.perf_counter()
                    await turn(counter)
                    contestant.durations.setdefault(depth, []).append(time.perf_counter() - started)
                    counter += 1
    report(title, contestants, depths)


def report(title: str, contestants: list[Contestant], depths: list[int]) -> None:
    ours = contestants[0]
    print(f"\n{title}")
    header = (
        "| contestant | " + " | ".join(f"depth {depth:,} | ours / it" for depth in depths) + " |"
    )
    print(header)
    print("|---|" + "---|---|" * len(depths))
    for contestant in contestants:
        if contestant.failure:
            print(f"| {contestant.name} | not run: {contestant.failure} |")
            continue
        cells = []
        for depth in depths:
            mine = contestant.durations.get(depth)
            base = ours.durations.get(depth)
            if not mine or not base:
                cells += ["-", "-"]
                continue
            ratio = statistics.median(base) / statistics.median(mine)
            cells += [f"{statistics.median(mine) * 1e3:.2f} ms", f"{ratio:.2f}x"]
        print(f"| {contestant.name} | " + " | ".join(cells) + " |")


async def main_async(args: argparse.Namespace, servers: Servers) -> None:
    families = [
        ("OpenAI Agents SDK: add_items([item]) + get_items(20)", agents_contestants, [10, 1000]),
        ("LangChain: add_messages([m]) + messages[-20:]", langchain_contestants, [10, 1000]),
        ("Django: load + change + save of a cached session", django_contestants, [10]),
    ]
    for title, build, depths in families:
        if args.only and args.only not in title.lower():
            continue
        contestants = build(servers)
        try:
            await run_family(title, contestants, depths, args.rounds, args.blocks)
        finally:
            for contestant in contestants:
                try:
                    await contestant.cleanup()
                except Exception:  # noqa: BLE001
                    traceback.print_exc(limit=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--only", help="run the families whose title holds this text")
    args = parser.parse_args()
    servers = Servers(
        os.environ.get("POSTGRES_CONNECTION_STRING", DEFAULT_DSN),
        os.environ.get("REDIS_URL", DEFAULT_REDIS),
    )
    try:
        asyncio.run(main_async(args, servers))
    finally:
        servers.clean()


if __name__ == "__main__":
    main()
