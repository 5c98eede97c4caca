"""The `Document` value returned by every store."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = ["Document"]


@dataclass(frozen=True)
class Document:
    """One stored document: its data plus the metadata the store keeps for it."""

    id: str
    collection: str
    data: dict[str, Any]
    created_at: datetime
    updated_at: datetime
    version: int
    expires_at: datetime | None = None
