"""A Django session engine backed by `SessionStore`.

```python
# settings.py
SESSION_ENGINE = "session.contrib.django"
SESSION_STORE_DOCSTORE_URL = "postgresql://..."  # default: POSTGRES_CONNECTION_STRING
SESSION_STORE_REDIS_URL = "redis://..."          # default: REDIS_URL
```

`SessionStore` here is a Django `SessionBase`: every method behaves as in
Django's own engines (`load`, `exists`, `create`, `save(must_create=...)`,
`delete`, `cycle_key`, `flush`, the expiry methods, `clear_expired`, and the
async twins), and `SessionMiddleware` works unchanged.

Mapping:

- the Django session key is the store's session id (unguessable, 256 bits);
  keys are always made by the store, never by Django's key generator;
- the session dict is kept as Django encodes it (`SessionBase.encode`: the
  configured `SESSION_SERIALIZER`, signed with `SECRET_KEY`) under the data
  key `"django"`, replaced whole on every save;
- a save sets the store's expiry to `get_expiry_age()` in the same statement
  (`update_session(..., ttl=...)`), so `SESSION_COOKIE_AGE` and `set_expiry`
  govern it; an age of zero or less deletes the session at once;
- `cycle_key()` is `rotate_session_id`: the data stays, the old key stops
  working at once, in both tiers;
- a key the store does not hold, or a session of the store that is not a
  Django session, is a miss: `load()` returns `{}` and the next save creates
  a new session (as Django's engines do with an unknown key);
- `clear_expired()` (the `clearsessions` command) is `purge_expired()`.

Settings (all optional):

- `SESSION_STORE_FACTORY` (default None): a callable, or its dotted path,
  returning the `SessionStore` to use; the settings below are then ignored
  (the store stays its creator's to close);
- `SESSION_STORE_DOCSTORE_URL` (None): the docstore URL, by the rules of
  `get_document_store` (None: `POSTGRES_CONNECTION_STRING`, `DATABASE_URL`);
- `SESSION_STORE_REDIS_URL` (None): the Redis URL (None: `REDIS_URL`);
- `SESSION_STORE_KEY_PREFIX` (`"djsess:"`): the Redis key prefix;
- `SESSION_STORE_CACHE_TTL` (3600): seconds a copy may live in Redis.

One store is built per configuration and process, on first use, and closed
when the interpreter exits.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable, Hashable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.base import SessionBase, UpdateError
from django.utils.module_loading import import_string

from ..config import get_session_store
from ..errors import SessionNotFound
from ..models import Session
from ..store import SessionStore as CachedSessionStore

__all__ = ["SessionStore", "get_store", "DATA_KEY"]

# The key of the store's session data that holds Django's encoded session dict.
DATA_KEY = "django"
# A Django session saved already expired lives this long (the store needs a
# positive ttl) before the engine deletes it.
_EXPIRED_TTL = 1.0

_stores_lock = threading.Lock()
_stores: dict[Hashable, CachedSessionStore] = {}


def _configuration() -> tuple[Hashable, Callable[[], CachedSessionStore], bool]:
    """Return (a key naming the configuration, how to build its store, whether we own it)."""
    factory = getattr(settings, "SESSION_STORE_FACTORY", None)
    if factory is not None:
        given = import_string(factory) if isinstance(factory, str) else factory
        return ("factory", factory), given, False
    docstore_url = getattr(settings, "SESSION_STORE_DOCSTORE_URL", None)
    redis_url = getattr(settings, "SESSION_STORE_REDIS_URL", None)
    key_prefix = getattr(settings, "SESSION_STORE_KEY_PREFIX", "djsess:")
    cache_ttl = getattr(settings, "SESSION_STORE_CACHE_TTL", 3600)

    def build() -> CachedSessionStore:
        return get_session_store(
            docstore_url=docstore_url,
            redis_url=redis_url,
            key_prefix=key_prefix,
            cache_ttl=cache_ttl,
        )

    return ("urls", docstore_url, redis_url, key_prefix, cache_ttl), build, True


def get_store() -> CachedSessionStore:
    """Return the store the settings name (built once per configuration and process)."""
    key, build, owned = _configuration()
    with _stores_lock:
        store = _stores.get(key)
        if store is None:
            store = build()
            _stores[key] = store
            if owned:
                atexit.register(store.close)
    return store


class SessionStore(SessionBase):
    """Django's `SessionBase` over the write-through cached `SessionStore`."""

    # A property of SessionBase (validated on assignment), declared for mypy.
    _session_key: str | None

    def __init__(self, session_key: str | None = None) -> None:
        self._store = get_store()
        super().__init__(session_key)

    # -- reading -------------------------------------------------------------------

    def _django_session(self, session_key: str | None) -> Session | None:
        """Return the store's session for `session_key` if it is a Django session."""
        if not isinstance(session_key, str) or not session_key:
            return None
        session = self._store.get_session(session_key)
        if session is None or not isinstance(session.data.get(DATA_KEY), str):
            return None
        return session

    def load(self) -> dict[str, Any]:
        session = self._django_session(self.session_key)
        if session is None:
            self._session_key = None
            return {}
        decoded: dict[str, Any] = self.decode(session.data[DATA_KEY])
        return decoded

    def exists(self, session_key: str | None) -> bool:
        return self._django_session(session_key) is not None

    # -- writing -------------------------------------------------------------------

    def create(self) -> None:
        self._create(self._get_session(no_load=True))

    def save(self, must_create: bool = False) -> None:
        if self.session_key is None or must_create:
            # The store makes every key: "must create" always means a new one.
            return self._create(self._get_session(no_load=True))
        data = self._get_session()
        if self.session_key is None:  # the key named no session of ours: start one
            return self._create(data)
        age = self.get_expiry_age()
        if age <= 0:
            self._store.delete_session(self.session_key)
            return None
        try:
            self._store.update_session(self.session_key, {DATA_KEY: self.encode(data)}, ttl=age)
        except SessionNotFound:
            # Deleted meanwhile (a logout in a concurrent request): never resurrected.
            raise UpdateError from None
        return None

    def _create(self, data: dict[str, Any]) -> None:
        age = self.get_expiry_age()
        session = self._store.create_session(
            data={DATA_KEY: self.encode(data)}, ttl=age if age > 0 else _EXPIRED_TTL
        )
        self._session_key = session.id
        self.modified = True
        if age <= 0:
            self._store.delete_session(session.id)

    def delete(self, session_key: str | None = None) -> None:
        if session_key is None:
            if self.session_key is None:
                return
            session_key = self.session_key
        if isinstance(session_key, str):
            self._store.delete_session(session_key)

    def cycle_key(self) -> None:
        """Give the session a new key, keeping its data (`rotate_session_id`)."""
        data = self._session
        key = self.session_key
        rotated: Session | None = None
        if key is not None:
            try:
                rotated = self._store.rotate_session_id(key)
            except SessionNotFound:
                rotated = None
        if rotated is None:
            self.create()
        else:
            self._session_key = rotated.id
            self.modified = True
        self._session_cache = data

    async def acycle_key(self) -> None:
        await sync_to_async(self.cycle_key)()

    @classmethod
    def clear_expired(cls) -> None:
        get_store().purge_expired()
