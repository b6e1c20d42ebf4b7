"""Timestamps as the status stores them (RFC 3339, UTC, milliseconds)."""

from __future__ import annotations

import datetime


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def now() -> float:
    return datetime.datetime.now(datetime.UTC).timestamp()
