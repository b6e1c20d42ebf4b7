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


def test_kopf_object_records_keep_the_object_and_drop_framework_fields() -> None:
    record = logging.LogRecord("kopf.objects", logging.INFO, __file__, 1, "recovery-step", (), None)
    ref = {"kind": "GhostServeDeployment", "name": "a"}
    record.__dict__.update(settings=object(), k8s_skip=False, k8s_ref=ref, step="rebuild")
    out = json.loads(logs.JsonFormatter().format(record))
    assert out["object"] == ref and out["step"] == "rebuild"
    assert not {"settings", "k8s_skip", "k8s_ref"} & set(out)
