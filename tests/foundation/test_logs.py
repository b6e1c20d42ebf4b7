"""The one log format: a JSON object per line with the event and the `extra` fields as keys."""

from __future__ import annotations

import io
import json
import logging

from ghostserve.wire import logs


def test_event_and_extra_fields_become_keys() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logs.setup("DEBUG", stream=stream)
        log = logging.getLogger("ghostserve.test")
        log.info("group-deleted", extra={"group": "ns/g", "bytes": 3})
        try:
            raise KeyError("boom")
        except KeyError:
            log.exception("failed", extra={"path": "/x"})
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert {k: first[k] for k in ("level", "logger", "event", "group", "bytes")} == {
        "level": "INFO", "logger": "ghostserve.test", "event": "group-deleted", "group": "ns/g", "bytes": 3,
    }  # fmt: skip
    assert first["time"].endswith("Z") and "exception" not in first
    assert second["event"] == "failed" and second["path"] == "/x"
    assert "KeyError: 'boom'" in second["exception"]
