"""A rank's background sender of sidecar calls: one implementation for both engines, in
ghostserve.engine.adapter (CommitSender: FIFO per rank, `submit`/`drain` as before, plus token records
and releases). Kept as a name here for the reference engine's imports."""

from __future__ import annotations

from ghostserve.engine import adapter

CommitSender = adapter.CommitSender
