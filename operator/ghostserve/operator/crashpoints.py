"""Named points where a test makes the operator SIGKILL itself (a seam for crash-recovery tests).

`GHOSTSERVE_OPERATOR_CRASH_AT=<point>` in the operator's environment: the first time the process
reaches `<point>` it sends itself SIGKILL (no cleanup, no flush: exactly what a node losing the
operator's pod does). Points are `before:<Step>` (a recorded step about to run) and
`after:<call>` (a sidecar or API call returned, its result not yet recorded). Unset: a no-op.
"""

from __future__ import annotations

import os
import signal

ENV = "GHOSTSERVE_OPERATOR_CRASH_AT"


def reached(point: str) -> None:
    if os.environ.get(ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)
