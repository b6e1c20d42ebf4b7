"""The Ready=False condition the operator writes when a reconcile pass fails (pure).

Replaces only the Ready entry of `status.conditions` (a map list keyed by type): a merge patch sends
the whole list, so the other conditions are carried over as they are.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

READY = "Ready"


def with_ready_false(
    conditions: Sequence[Mapping[str, Any]],
    *,
    reason: str,
    message: str,
    generation: int | None,
    now: str,
) -> list[dict[str, Any]]:
    """`conditions` with Ready set to False for `reason`; lastTransitionTime kept if it was False already."""
    old = next((c for c in conditions if c.get("type") == READY), None)
    ready: dict[str, Any] = {
        "type": READY,
        "status": "False",
        "reason": reason,
        "message": message[:32768],
        "lastTransitionTime": old["lastTransitionTime"]
        if old and old.get("status") == "False" and old.get("lastTransitionTime")
        else now,
    }
    if generation is not None:
        ready["observedGeneration"] = int(generation)
    return [dict(c) for c in conditions if c.get("type") != READY] + [ready]
