"""The Django session engine, tested as Django tests its own engines, plus a request cycle.

`TestSessionBehaviour` reproduces the behaviours of Django's SessionTestsMixin
(tests/sessions_tests/tests.py: every engine must pass them), sync and async,
against `session.contrib.django` on each backend; the engine-specific tests
follow; then real requests through Django's test clients and SessionMiddleware.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import django
import pytest
from adapter_backends import Backend
from django.conf import settings

if not settings.configured:
    settings.configure(
        SECRET_KEY="tests only, never a real secret",
        INSTALLED_APPS=["django.contrib.sessions"],
        SESSION_ENGINE="session.contrib.django",
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware"],
        ROOT_URLCONF=__name__,
        DATABASES={},
        USE_TZ=True,
        ALLOWED_HOSTS=["testserver"],
    )
    django.setup()

from django.contrib.sessions.backends.base import UpdateError  # noqa: E402
from django.core import management  # noqa: E402
from django.core.signing import TimestampSigner  # noqa: E402
from django.http import HttpRequest, HttpResponse, JsonResponse  # noqa: E402
from django.test import AsyncClient, Client, override_settings  # noqa: E402
from django.urls import path  # noqa: E402
from django.utils import timezone  # noqa: E402

from session import SessionStore as CachedSessionStore  # noqa: E402
from session.contrib import django as engine  # noqa: E402
from session.contrib.django import DATA_KEY, SessionStore  # noqa: E402


@pytest.fixture
def store(backend: Backend) -> Iterator[CachedSessionStore]:
    cached = backend.store()
    with override_settings(SESSION_STORE_FACTORY=lambda: cached):
        yield cached


@pytest.fixture
def session(store: CachedSessionStore) -> Iterator[SessionStore]:
    created = SessionStore()
    yield created
    created.delete()


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# --------------------------------------------------------------------------- Django's mixin


class TestSessionBehaviour:
    """What Django's SessionTestsMixin asks of every engine."""

    def test_new_session(self, session: SessionStore) -> None:
        assert session.modified is False and session.accessed is False

    def test_get_empty(self, session: SessionStore) -> None:
        assert session.get("cat") is None
        assert run(session.aget("cat")) is None

    def test_store_and_pop(self, session: SessionStore) -> None:
        session["cat"] = "dog"
        assert session.modified is True
        assert session.pop("cat") == "dog"
        run(session.aset("cat", "dog"))
        assert run(session.apop("cat")) == "dog"
        assert session.get("cat") is None

    def test_pop_default(self, session: SessionStore) -> None:
        assert session.pop("some key", "does not exist") == "does not exist"
        assert session.pop("some key", default="does not exist") == "does not exist"
        assert run(session.apop("some key", "does not exist")) == "does not exist"
        assert session.accessed is True and session.modified is False
        with pytest.raises(KeyError):
            session.pop("some key")
        with pytest.raises(KeyError):
            run(session.apop("some key"))

    def test_setdefault_update_has_key(self, session: SessionStore) -> None:
        assert session.setdefault("foo", "bar") == "bar"
        assert session.setdefault("foo", "baz") == "bar"
        assert run(session.asetdefault("foo", "qux")) == "bar"
        session.update({"update key": 1})
        run(session.aupdate({"async key": 2}))
        assert session.accessed is True and session.modified is True
        session.modified = session.accessed = False
        assert "update key" in session
        assert run(session.ahas_key("async key")) is True
        assert session.accessed is True and session.modified is False

    def test_keys_values_items_clear(self, session: SessionStore) -> None:
        assert list(session.values()) == []
        session["x"] = 1
        session.modified = session.accessed = False
        assert list(session.keys()) == ["x"]
        assert list(session.values()) == [1]
        assert list(session.items()) == [("x", 1)]
        assert list(run(session.akeys())) == ["x"]
        assert list(run(session.avalues())) == [1]
        assert list(run(session.aitems())) == [("x", 1)]
        assert session.accessed is True and session.modified is False
        session.clear()
        assert list(session.items()) == []
        assert session.modified is True

    def test_save(self, session: SessionStore) -> None:
        session.save()
        assert session.exists(session.session_key) is True

    def test_save_async(self, session: SessionStore) -> None:
        run(session.asave())
        assert run(session.aexists(session.session_key)) is True

    def test_delete(self, session: SessionStore) -> None:
        session.save()
        session.delete(session.session_key)
        assert session.exists(session.session_key) is False
        run(session.asave(must_create=True))
        run(session.adelete(session.session_key))
        assert run(session.aexists(session.session_key)) is False

    @pytest.mark.parametrize("use_async", [False, True])
    def test_flush(self, session: SessionStore, use_async: bool) -> None:
        session["foo"] = "bar"
        session.save()
        prev_key = session.session_key
        if use_async:
            run(session.aflush())
        else:
            session.flush()
        assert session.exists(prev_key) is False
        assert session.session_key is None
        assert session.modified is True and session.accessed is True

    @pytest.mark.parametrize("use_async", [False, True])
    def test_cycle(self, session: SessionStore, use_async: bool) -> None:
        session["a"], session["b"] = "c", "d"
        session.save()
        prev_key = session.session_key
        prev_data = list(session.items())
        if use_async:
            run(session.acycle_key())
        else:
            session.cycle_key()
        assert session.exists(prev_key) is False
        assert session.session_key != prev_key
        assert list(session.items()) == prev_data
        assert SessionStore(session.session_key).load() == dict(prev_data)

    @pytest.mark.parametrize("use_async", [False, True])
    def test_cycle_with_no_session_cache(self, session: SessionStore, use_async: bool) -> None:
        session["a"], session["b"] = "c", "d"
        session.save()
        prev_data = list(session.items())
        fresh = SessionStore(session.session_key)
        assert hasattr(fresh, "_session_cache") is False
        if use_async:
            run(fresh.acycle_key())
        else:
            fresh.cycle_key()
        assert sorted(fresh.items()) == sorted(prev_data)
        fresh.delete()

    def test_save_doesnt_clear_data(self, session: SessionStore) -> None:
        session["a"] = "b"
        session.save()
        assert session["a"] == "b"
        run(session.asave())
        assert run(session.aget("a")) == "b"

    @pytest.mark.parametrize("use_async", [False, True])
    def test_invalid_key(self, store: CachedSessionStore, use_async: bool) -> None:
        invalid = SessionStore("1")
        if use_async:
            run(invalid.asave())
        else:
            invalid.save()
        assert invalid.session_key != "1"
        assert invalid.get("cat") is None
        invalid.delete()
        invalid.delete("1")

    def test_session_key_validation(self, session: SessionStore) -> None:
        session._session_key = ""
        assert session.session_key is None
        session._session_key = "1234567"
        assert session.session_key is None
        session._session_key = "12345678"
        assert session.session_key == "12345678"
        with pytest.raises(AttributeError):
            session.session_key = "another key"  # type: ignore[misc]

    def test_default_expiry(self, session: SessionStore) -> None:
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE
        session.set_expiry(0)
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE
        run(session.aset_expiry(0))
        assert run(session.aget_expiry_age()) == settings.SESSION_COOKIE_AGE

    @pytest.mark.parametrize(
        "expiry", [10, timedelta(seconds=10), "datetime"], ids=["seconds", "timedelta", "datetime"]
    )
    def test_custom_expiry(self, session: SessionStore, expiry: Any) -> None:
        modification = timezone.now()
        value = modification + timedelta(seconds=10) if expiry == "datetime" else expiry
        original_now = timezone.now
        try:
            timezone.now = lambda: modification  # set_expiry reads it for a timedelta
            session.set_expiry(value)
        finally:
            timezone.now = original_now
        assert session.get_expiry_date(modification=modification) == modification + timedelta(
            seconds=10
        )
        assert session.get_expiry_age(modification=modification) == 10
        assert run(session.aget_expiry_age(modification=modification)) == 10

    def test_custom_expiry_reset(self, session: SessionStore) -> None:
        session.set_expiry(None)
        session.set_expiry(10)
        session.set_expiry(None)
        assert session.get_expiry_age() == settings.SESSION_COOKIE_AGE

    def test_get_expire_at_browser_close(self, session: SessionStore) -> None:
        for at_close in (False, True):
            with override_settings(SESSION_EXPIRE_AT_BROWSER_CLOSE=at_close):
                session.set_expiry(10)
                assert session.get_expire_at_browser_close() is False
                session.set_expiry(0)
                assert session.get_expire_at_browser_close() is True
                assert run(session.aget_expire_at_browser_close()) is True
                session.set_expiry(None)
                assert session.get_expire_at_browser_close() is at_close

    def test_decode(self, session: SessionStore, caplog: pytest.LogCaptureFixture) -> None:
        data = {"a test key": "a test value"}
        assert session.decode(session.encode(data)) == data
        for encoded in (base64.b64encode(b"flaskdj:alkdjf").decode("ascii"), "bad:encoded:value"):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="django.security.SuspiciousSession"):
                assert session.decode(encoded) == {}
            assert "Session data corrupted" in caplog.text
        signer = TimestampSigner(salt=session.key_salt)
        assert session.decode(signer.sign(b"invalid data")) == {}

    @pytest.mark.parametrize("use_async", [False, True])
    def test_actual_expiry(self, session: SessionStore, use_async: bool) -> None:
        session["foo"] = "bar"
        session.set_expiry(-timedelta(seconds=10))
        if use_async:
            run(session.asave())
        else:
            session.save()
        # With an expiry date in the past, the session expires instantly.
        again = SessionStore(session.session_key)
        assert "foo" not in again
        assert again.session_key is None

    @pytest.mark.parametrize("use_async", [False, True])
    def test_session_load_does_not_create_record(
        self, store: CachedSessionStore, use_async: bool
    ) -> None:
        unknown = SessionStore("someunknownkey")
        if use_async:
            run(unknown.aload())
        else:
            unknown.load()
        assert unknown.session_key is None
        assert unknown.exists(unknown.session_key) is False
        assert unknown.exists("someunknownkey") is False

    @pytest.mark.parametrize("use_async", [False, True])
    def test_save_does_not_resurrect_a_session_logged_out_elsewhere(
        self, store: CachedSessionStore, use_async: bool
    ) -> None:
        first = SessionStore()
        first["test_data"] = "value1"
        first.save(must_create=True)
        SessionStore(first.session_key).delete()  # a logout in another request
        first["test_data"] = "value2"
        with pytest.raises(UpdateError):
            if use_async:
                run(first.asave())
            else:
                first.save()
        assert first.load() == {}

    def test_clear_expired(self, store: CachedSessionStore, backend: Backend) -> None:
        live = SessionStore()
        live["foo"] = "bar"
        live.set_expiry(3600)
        live.save()
        short = SessionStore()
        short["foo"] = "bar"
        short.set_expiry(1)
        short.save()
        deadline = time.monotonic() + 10
        while short.exists(short.session_key):
            assert time.monotonic() < deadline, "the short session never expired"
            time.sleep(0.05)  # polling with a deadline
        management.call_command("clearsessions")
        assert store.purge_expired() == 0  # clearsessions purged it already
        run(SessionStore.aclear_expired())
        assert live.exists(live.session_key) is True
        live.delete()


# --------------------------------------------------------------------------- this engine


def test_keys_that_are_not_ours_are_a_clean_miss(store: CachedSessionStore) -> None:
    foreign = store.create_session("someone", {"cart": [1]})  # a session, but not Django's
    keys = [
        "a" * 32,  # what Django's db engine would have issued
        foreign.id,
        "x" * 300,
        "nul\x00inside",
        "{braces}}{",
        "ünïcødé-key",
        "\udcff-surrogate",
    ]
    for key in keys:
        django_session = SessionStore(key)
        assert django_session.load() == {}
        assert django_session.session_key is None
        assert django_session.exists(key) is False
        assert run(SessionStore(key).aload()) == {}
        django_session["new"] = 1
        django_session.save()
        assert django_session.session_key not in keys
        assert SessionStore(django_session.session_key).load() == {"new": 1}
        django_session.delete()
    assert store.get_session(foreign.id) == foreign  # untouched


def test_expiry_reaches_the_store(store: CachedSessionStore) -> None:
    django_session = SessionStore()
    django_session["k"] = "v"
    django_session.set_expiry(120)
    django_session.save()
    stored = store.get_session(django_session.session_key)
    assert stored is not None and stored.expires_at is not None
    assert abs((stored.expires_at - stored.updated_at).total_seconds() - 120) < 2
    django_session.set_expiry(None)  # back to SESSION_COOKIE_AGE
    django_session.save()
    stored = store.get_session(django_session.session_key)
    assert stored is not None and stored.expires_at is not None
    remaining = (stored.expires_at - stored.updated_at).total_seconds()
    assert abs(remaining - settings.SESSION_COOKIE_AGE) < 2
    assert set(stored.data) == {DATA_KEY}
    django_session.delete()


def test_another_process_and_a_restart_see_every_save(backend: Backend) -> None:
    first, second = backend.store(), backend.store()
    with override_settings(SESSION_STORE_FACTORY=lambda: first):
        writer = SessionStore()
        writer["n"] = 1
        writer.save()
        key = writer.session_key
    with override_settings(SESSION_STORE_FACTORY=lambda: second):
        assert SessionStore(key)["n"] == 1  # now cached in Redis
    with override_settings(SESSION_STORE_FACTORY=lambda: first):
        writer["n"] = 2
        writer.save()
    with override_settings(SESSION_STORE_FACTORY=lambda: second):
        assert SessionStore(key)["n"] == 2
    restarted = backend.restart()
    with override_settings(SESSION_STORE_FACTORY=lambda: restarted):
        assert SessionStore(key)["n"] == 2
        SessionStore(key).delete()


def test_store_from_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_CONNECTION_STRING", "memory://")
    monkeypatch.delenv("REDIS_URL", raising=False)  # an in-process cache, never the shared one
    with override_settings(SESSION_STORE_KEY_PREFIX="djtest:", SESSION_STORE_CACHE_TTL=60):
        built = engine.get_store()
        assert engine.get_store() is built  # one per configuration
        django_session = SessionStore()
        django_session["x"] = 1
        django_session.save()
        assert SessionStore(django_session.session_key)["x"] == 1
    with override_settings(SESSION_STORE_FACTORY=f"{__name__}.factory_for_settings_test"):
        assert engine.get_store() is FACTORY_STORE[0]


FACTORY_STORE: list[CachedSessionStore] = []


def factory_for_settings_test() -> CachedSessionStore:
    from docstore import MemoryDocumentStore

    FACTORY_STORE.append(CachedSessionStore(MemoryDocumentStore()))
    return FACTORY_STORE[0]


# --------------------------------------------------------------------------- requests


def count(request: HttpRequest) -> HttpResponse:
    request.session["count"] = request.session.get("count", 0) + 1
    return JsonResponse({"count": request.session["count"]})


def login(request: HttpRequest) -> HttpResponse:
    request.session.cycle_key()  # what django.contrib.auth.login does
    request.session["user"] = "alice"
    return JsonResponse({"count": request.session.get("count")})


def logout(request: HttpRequest) -> HttpResponse:
    request.session.flush()
    return HttpResponse("bye")


def peek(request: HttpRequest) -> HttpResponse:
    return JsonResponse(dict(request.session.items()))


def logged_out_elsewhere(request: HttpRequest) -> HttpResponse:
    request.session.get("count")  # loaded before the concurrent logout
    SessionStore(request.session.session_key).delete()
    request.session["late"] = True
    return HttpResponse("too late")


async def async_count(request: HttpRequest) -> HttpResponse:
    value = await request.session.aget("count", 0) + 1
    await request.session.aset("count", value)
    return JsonResponse({"count": value})


urlpatterns = [
    path("count", count),
    path("login", login),
    path("logout", logout),
    path("peek", peek),
    path("elsewhere", logged_out_elsewhere),
    path("async-count", async_count),
]


def cookie(client: Client | AsyncClient) -> str:
    return client.cookies[settings.SESSION_COOKIE_NAME].value


def test_a_request_cycle_through_the_middleware(
    backend: Backend, store: CachedSessionStore
) -> None:
    client = Client()
    assert [client.get("/count").json()["count"] for _ in range(3)] == [1, 2, 3]
    key = cookie(client)
    assert store.get_session(key) is not None
    morsel = client.cookies[settings.SESSION_COOKIE_NAME]
    assert morsel["httponly"] and int(morsel["max-age"]) == settings.SESSION_COOKIE_AGE

    assert client.get("/login").json() == {"count": 3}
    rotated = cookie(client)
    assert rotated != key
    assert store.get_session(key) is None  # the old key stops working at once
    assert client.get("/peek").json() == {"count": 3, "user": "alice"}

    # A restarted process with an empty cache serves the same session.
    restarted = backend.restart()
    with override_settings(SESSION_STORE_FACTORY=lambda: restarted):
        assert client.get("/count").json()["count"] == 4
        assert client.get("/logout").content == b"bye"
        assert restarted.get_session(rotated) is None
        assert client.get("/peek").json() == {}
        assert client.get("/count").json()["count"] == 1
        assert cookie(client) not in (key, rotated)

        # A logout in a concurrent request: the session is not brought back.
        # (SessionMiddleware raises SessionInterrupted, which Django answers with a 400.)
        logged_out = cookie(client)
        assert client.get("/elsewhere").status_code == 400
        assert restarted.get_session(logged_out) is None

        stranger = Client()
        stranger.cookies[settings.SESSION_COOKIE_NAME] = "not-one-of-ours-" + "k" * 20
        assert stranger.get("/count").json()["count"] == 1
        assert cookie(stranger) != "not-one-of-ours-" + "k" * 20


def test_async_requests(store: CachedSessionStore) -> None:
    async def scenario() -> list[int]:
        client = AsyncClient()
        counts = []
        for _ in range(3):
            response = await client.get("/async-count")
            counts.append(response.json()["count"])
        assert store.get_session(cookie(client)) is not None
        return counts

    assert run(scenario()) == [1, 2, 3]
