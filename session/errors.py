"""The session package's exception hierarchy: one base class, builtin mixins where they help.

`VersionConflict` and `StoreUnavailable` subclass both `SessionError` and the
docstore's class of the same name, so callers may catch either family.
"""

from __future__ import annotations

import docstore

__all__ = [
    "SessionError",
    "SessionNotFound",
    "InvalidSessionData",
    "VersionConflict",
    "StoreUnavailable",
]


class SessionError(Exception):
    """Base class of every error the session store raises."""


class SessionNotFound(SessionError, LookupError):
    """The session is missing or expired."""


class InvalidSessionData(SessionError, ValueError):
    """Input the store refuses to write (nothing was written, in either tier)."""


class VersionConflict(docstore.VersionConflict, SessionError):
    """The session's version differs from the `expected_version` the caller gave."""


class StoreUnavailable(docstore.StoreUnavailable, SessionError):
    """PostgreSQL cannot be reached, or the connection broke during the call.

    `outcome_unknown` is True when a write may have been committed anyway.
    """
