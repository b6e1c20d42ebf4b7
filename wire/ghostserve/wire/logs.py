"""One log style for every GhostServe process: stdlib logging, one JSON object per line on stderr.

Write `log.info("group-deleted", extra={"group": name, "bytes": n})`: the message is a constant event
name (structlog's convention, so lines group by event) and the fields go in `extra`, never formatted into
the text. The formatter lives in wire because wire is the lowest layer every component (sidecar, engines,
operator, gateway, cluster) may import (docs/design.md, "Logging"); it needs only the standard library.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`. kopf's per-object
# loggers (the operator) add their settings object and a flag of their own: not log fields.
_RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message", "asctime", "settings", "k8s_skip",
}  # fmt: skip
# ... and the object a record is about, under a clearer name.
_RENAMED = {"k8s_ref": "object"}


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "event", **extra, "exception"?} as one JSON line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                out[_RENAMED.get(key, key)] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup(level: str | None = None, *, stream: TextIO | None = None) -> None:
    """Route the root logger to `stream` (stderr) as JSON lines, replacing its handlers. Level: `level`,
    else GHOSTSERVE_LOG_LEVEL, else INFO."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("GHOSTSERVE_LOG_LEVEL") or "INFO").upper())
