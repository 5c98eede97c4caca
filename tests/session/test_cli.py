"""`python -m session` / `session-store`: the operator's commands.

Most tests call `main(argv)` in this process. A command opens its own store
with `get_session_store()`; where a test needs data written beforehand, the
commands are pointed at one shared memory store and fakeredis server (or, in
the subprocess tests, at the embedded PostgreSQL server).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest
from contract.session_contract import FakeClock

import session.cli
import session.protocol
from docstore import MemoryDocumentStore, PostgresDocumentStore
from session import SessionStore
from session.cli import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE, main
from session.config import describe_backends
from session.store import short_hash

SERVER_VARIABLES = ("POSTGRES_CONNECTION_STRING", "DATABASE_URL", "REDIS_URL", "SESSION_KEY_PREFIX")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No server configured by the environment this test runs in."""
    for variable in SERVER_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    return monkeypatch


@pytest.fixture
def opened_prefixes() -> list[str]:
    """The key prefixes of the stores the commands opened, in order."""
    return []


@pytest.fixture
def fake_server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def shared_store(
    clean_env: pytest.MonkeyPatch,
    opened_prefixes: list[str],
    fake_server: fakeredis.FakeServer,
    clock: FakeClock,
) -> Iterator[SessionStore]:
    """Make every command open a store on one memory docstore and one fakeredis server.

    The key prefix each command asked for is recorded in `opened_prefixes`. Both
    stores run on `clock`, which a test moves instead of waiting.
    """
    documents = MemoryDocumentStore(clock=clock)
    server = fake_server
    clients: list[fakeredis.FakeRedis] = []

    def open_store(
        *, docstore_url: str | None = None, redis_url: str | None = None, key_prefix: str = "sess:"
    ) -> SessionStore:
        opened_prefixes.append(key_prefix)
        client = fakeredis.FakeRedis(server=server)
        clients.append(client)
        return SessionStore(
            documents, client, owns_cache=True, key_prefix=key_prefix, clock=clock
        )

    clean_env.setattr(session.cli, "get_session_store", open_store)
    with open_store() as store:
        yield store
    for client in clients:
        client.close()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_get_prints_the_session(
    shared_store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    created = shared_store.create_session("alice", {"theme": "dark"})
    assert main(["get", created.id]) == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert printed["id"] == created.id
    assert printed["user_id"] == "alice"
    assert printed["data"] == {"theme": "dark"}
    assert printed["version"] == 1
    assert printed["created_at"] == created.created_at.isoformat()


def test_get_missing_session(
    shared_store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "no-such-session-" + "x" * 30
    assert main(["-v", "get", missing]) == EXIT_FAILED
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no such session" in captured.err
    assert missing not in captured.err


def test_messages_with_paging(
    shared_store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    created = shared_store.create_session()
    for number in range(1, 6):
        shared_store.add_message(created.id, "user", f"m{number}", metadata={"n": number})
    assert main(["messages", created.id]) == EXIT_OK
    everything = json_lines(capsys.readouterr().out)
    assert [m["content"] for m in everything] == ["m1", "m2", "m3", "m4", "m5"]
    assert everything[0]["metadata"] == {"n": 1} and everything[0]["seq"] == 1
    assert main(["messages", created.id, "--limit", "2"]) == EXIT_OK
    assert [m["seq"] for m in json_lines(capsys.readouterr().out)] == [4, 5]
    assert main(["messages", created.id, "--after-seq", "1", "--limit", "2"]) == EXIT_OK
    assert [m["seq"] for m in json_lines(capsys.readouterr().out)] == [2, 3]


def test_messages_of_a_missing_session(
    shared_store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["messages", "missing"]) == EXIT_FAILED
    assert "no such session" in capsys.readouterr().err


def test_list_hides_ids_unless_asked(
    shared_store: SessionStore, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    older = shared_store.create_session("carol", {"n": 1})
    clock.advance(1)  # most recently updated first
    newer = shared_store.create_session("carol", {"n": 2})
    shared_store.create_session("dave")
    assert main(["list", "carol"]) == EXIT_OK
    out = capsys.readouterr().out
    assert older.id not in out and newer.id not in out
    listed = json_lines(out)
    assert [s["id_hash"] for s in listed] == [short_hash(newer.id), short_hash(older.id)]
    assert main(["list", "carol", "--show-ids", "--limit", "1"]) == EXIT_OK
    assert [s["id"] for s in json_lines(capsys.readouterr().out)] == [newer.id]


def test_purge_expired(
    shared_store: SessionStore, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    doomed = shared_store.create_session(ttl=60)
    shared_store.add_message(doomed.id, "user", "bye")
    kept = shared_store.create_session()
    clock.advance(61)
    assert shared_store.get_session(doomed.id) is None
    assert main(["purge-expired", "--batch-size", "10"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == {"purged": 2}
    assert shared_store.get_session(kept.id) == kept


def test_check_healthy(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("DATABASE_URL", "memory://")
    assert main(["check"]) == EXIT_OK
    report = json.loads(capsys.readouterr().out)
    assert report["healthy"] is True
    assert report["postgres"]["ok"] is True and report["redis"]["ok"] is True
    assert "in-memory store" in report["postgres"]["backend"]
    assert "in-process fakeredis" in report["redis"]["backend"]
    assert report["key_prefix"] == "sess:"


def test_check_reports_an_unreachable_redis(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", "memory://")
    clean_env.setenv("REDIS_URL", "redis://:secret@127.0.0.1:1/0")
    assert main(["check"]) == EXIT_UNAVAILABLE
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["healthy"] is False
    assert report["postgres"]["ok"] is True
    assert report["redis"]["ok"] is False and "unreachable" in report["redis"]["error"]
    assert "secret" not in out


def test_check_reports_an_unreachable_postgres(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("POSTGRES_CONNECTION_STRING", "postgresql://u:secret@127.0.0.1:1/x")
    assert main(["check"]) == EXIT_UNAVAILABLE
    out = capsys.readouterr().out
    report = json.loads(out)
    assert report["healthy"] is False and report["postgres"]["ok"] is False
    assert "cannot" in report["postgres"]["error"]
    assert "secret" not in out


# Every command, with the arguments it needs, as the exit-status tests run it.
EVERY_COMMAND = [
    ["get", "some-id"],
    ["messages", "some-id"],
    ["list", "alice"],
    ["purge-expired"],
    ["check"],
    ["demo", "--sessions", "1", "--messages", "1"],
]


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: argv[0])
def test_unavailable_postgres_exits_3_from_every_command(
    argv: list[str], clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("POSTGRES_CONNECTION_STRING", "postgresql://u@127.0.0.1:1/x")
    assert main(argv) == EXIT_UNAVAILABLE
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if argv[0] != "check":  # check reports in its JSON instead
        assert captured.err.startswith("session-store: cannot connect")


def test_a_failing_redis_is_reported_but_the_answer_stands(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", "memory://")
    clean_env.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    assert main(["get", "missing"]) == EXIT_FAILED
    assert main(["messages", "missing"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.count("warning: Redis unavailable") == 2 and "answered from PostgreSQL" in err
    assert main(["list", "alice"]) == EXIT_OK  # a docstore query: Redis is not asked
    assert capsys.readouterr().err == ""


MALFORMED = [
    ("REDIS_URL", "notaurl"),
    ("REDIS_URL", "redis://:hunter2@host:port/0"),
    ("POSTGRES_CONNECTION_STRING", "mysql://app:hunter2@db/chat"),
    ("POSTGRES_CONNECTION_STRING", "postgresql://app:hunter2@db:port/chat"),
    ("DATABASE_URL", "host=db password='hunter2"),
    ("SESSION_KEY_PREFIX", "app{hunter2}:"),
]


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: argv[0])
@pytest.mark.parametrize(("variable", "value"), MALFORMED)
def test_a_malformed_variable_is_one_line_naming_it(
    argv: list[str],
    variable: str,
    value: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if variable == "REDIS_URL":
        clean_env.setenv("DATABASE_URL", "memory://")
    clean_env.setenv(variable, value)
    assert main(argv) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.out == ""
    assert len(captured.err.splitlines()) == 1, captured.err
    assert captured.err.startswith(f"session-store: {variable}: ")
    assert "hunter2" not in captured.err


def test_a_malformed_variable_in_a_real_process_has_no_traceback() -> None:
    env = server_free_env() | {"DATABASE_URL": "memory://", "REDIS_URL": "notaurl"}
    completed = run_cli("check", env=env)
    assert completed.returncode == EXIT_USAGE
    assert completed.stdout == ""
    assert completed.stderr.startswith("session-store: REDIS_URL: not a Redis URL")
    assert len(completed.stderr.splitlines()) == 1


@pytest.mark.parametrize("argv", EVERY_COMMAND, ids=lambda argv: argv[0])
def test_every_command_takes_a_key_prefix(
    argv: list[str],
    shared_store: SessionStore,
    opened_prefixes: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(session.demo, "get_session_store", session.cli.get_session_store)
    opened_prefixes.clear()
    main([argv[0], "--key-prefix", "app:", *argv[1:]])
    main(["--key-prefix", "before:", *argv])
    monkeypatch.setenv("SESSION_KEY_PREFIX", "env:")
    main(argv)
    main([*argv, "--key-prefix", "flag-wins:"])
    capsys.readouterr()
    assert set(opened_prefixes) == {"app:", "before:", "env:", "flag-wins:"}
    assert main([*argv, "--key-prefix", "bad{"]) == EXIT_USAGE
    assert capsys.readouterr().err.startswith("session-store: --key-prefix: ")


def test_a_key_prefix_reaches_the_stores_keys(
    shared_store: SessionStore,
    fake_server: fakeredis.FakeServer,
    capsys: pytest.CaptureFixture[str],
) -> None:
    created = shared_store.create_session("alice")
    assert main(["--key-prefix", "app:", "get", created.id]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["id"] == created.id
    with fakeredis.FakeRedis(server=fake_server) as client:
        keys = {key.decode() for key in client.scan_iter(match="app:*")}
    assert keys == {f"app:{{{created.id}}}:s"}  # the command's miss filled its own namespace


@pytest.mark.parametrize(
    "argv",
    [[], ["get"], ["messages", "x", "--limit", "-1"], ["purge-expired", "--batch-size", "0"]],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code == 2
    assert "usage:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "minimum"),
    [
        (["messages", "x", "--limit"], "x", 0),
        (["messages", "x", "--limit"], "-1", 0),
        (["messages", "x", "--after-seq"], "1.5", 0),
        (["list", "u", "--limit"], "x", 0),
        (["purge-expired", "--batch-size"], "x", 1),
        (["purge-expired", "--batch-size"], "0", 1),
        (["demo", "--sessions"], "x", 1),
        (["demo", "--messages"], "0", 1),
    ],
)
def test_integer_options_read_alike(
    option: list[str], value: str, minimum: int, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main([*option, value])
    assert raised.value.code == EXIT_USAGE
    assert f"expected an integer >= {minimum}, got {value!r}" in capsys.readouterr().err


def test_demo_on_a_memory_store(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("DATABASE_URL", "memory://")
    assert main(["demo", "--sessions", "2", "--messages", "3"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "restart skipped" in out
    assert out.rstrip().endswith("demo OK")


# --------------------------------------------------------------------------- subprocesses


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "session", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def server_free_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SERVER_VARIABLES}


@pytest.mark.embedded
def test_python_m_session_reads_what_another_process_wrote(embedded_dsn: str) -> None:
    with SessionStore(PostgresDocumentStore(embedded_dsn), owns_docstore=True) as store:
        created = store.create_session("erin", {"k": "v"})
        store.add_message(created.id, "user", "hello")
        store.add_message(created.id, "assistant", "hi")
        try:
            env = server_free_env() | {"POSTGRES_CONNECTION_STRING": embedded_dsn}
            got = run_cli("get", created.id, env=env)
            assert got.returncode == EXIT_OK, got.stderr
            assert json.loads(got.stdout)["version"] == 3
            listed = run_cli("messages", created.id, env=env)
            assert listed.returncode == EXIT_OK, listed.stderr
            assert [(m["seq"], m["role"]) for m in json_lines(listed.stdout)] == [
                (1, "user"),
                (2, "assistant"),
            ]
            assert created.id not in listed.stderr
        finally:
            store.delete_session(created.id)


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "session-store"
    assert script.exists(), "pip install -e . installs the session-store console script"
    completed = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert completed.returncode == EXIT_OK
    for command in ("demo", "get", "messages", "list", "purge-expired", "check"):
        assert command in completed.stdout


def test_describe_backends_never_shows_a_password(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("DATABASE_URL", "postgresql://app:hunter2@db.internal:5433/chat")
    clean_env.setenv("REDIS_URL", "rediss://:hunter2@cache.internal:6380/2")
    backends = describe_backends()
    assert backends.docstore == "PostgreSQL app@db.internal:5433/chat (from DATABASE_URL)"
    assert backends.cache == "Redis rediss://cache.internal:6380/2 (from REDIS_URL)"
    assert backends.persistent and backends.shared_cache
    keyword = describe_backends(docstore_url="host=h password=hunter2 dbname=d", redis_url="")
    assert "hunter2" not in keyword.docstore and "h" in keyword.docstore
    assert not keyword.shared_cache and "fakeredis" in keyword.cache


def test_describe_backends_defaults(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("DOCSTORE_DATA_DIR", str(tmp_path))
    backends = describe_backends()
    assert backends.docstore == f"embedded PostgreSQL, data in {tmp_path}"
    assert backends.persistent and not backends.shared_cache
    assert not describe_backends(docstore_url="memory://").persistent


def test_generated_ids_never_start_with_a_dash(
    shared_store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # token_urlsafe starts with "-" one time in 64; such an id reads as an option.
    draws = iter(
        ["-conversation", "Conversation", "_underscore", "-dash", "Created", "-x", "Rotated"]
    )
    monkeypatch.setattr(session.protocol.secrets, "token_urlsafe", lambda nbytes: next(draws))
    created = shared_store.create_session()
    assert created.id == "Created"
    assert shared_store.rotate_session_id(created.id).id == "Rotated"


def test_an_id_that_starts_with_a_dash_goes_after_double_dash(
    shared_store: SessionStore, capsys: pytest.CaptureFixture[str]
) -> None:
    created = shared_store.create_session("-bob")
    with pytest.raises(SystemExit):
        main(["list", "-bob"])
    capsys.readouterr()
    assert main(["list", "--show-ids", "--", "-bob"]) == EXIT_OK
    assert [s["id"] for s in json_lines(capsys.readouterr().out)] == [created.id]
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    assert "goes after '--'" in capsys.readouterr().out
