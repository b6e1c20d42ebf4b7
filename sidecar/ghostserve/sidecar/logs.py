"""Structured logs: the one GhostServe format (ghostserve.wire.logs), re-exported for the sidecar's CLI."""

from __future__ import annotations

from ghostserve.wire.logs import JsonFormatter, setup

__all__ = ["JsonFormatter", "setup"]
