"""The deployment's phase as one explicit function of observed facts (pure)."""

from __future__ import annotations

PENDING, STARTING, SERVING = "Pending", "Starting", "Serving"
RECOVERING, DEGRADED, FAILED = "Recovering", "Degraded", "Failed"
PHASES = (PENDING, STARTING, SERVING, RECOVERING, DEGRADED, FAILED)


def next_phase(
    *,
    spec_valid: bool,
    total_ranks: int,
    scheduled_ranks: int,
    ready_ranks: int,
    recovering: bool,
    gave_up: bool,
    ever_served: bool,
) -> str:
    """Phase from the facts, first match wins:

    invalid spec -> Failed; recovery budget spent -> Degraded while some ranks still run, else
    Failed; a recovery in flight -> Recovering; all ranks ready -> Serving; ranks lost after the
    deployment served (no recovery started yet, e.g. inside the backoff) -> Degraded; some ranks
    scheduled -> Starting; else Pending."""
    if not spec_valid:
        return FAILED
    if gave_up:
        return DEGRADED if ready_ranks else FAILED
    if recovering:
        return RECOVERING
    if total_ranks and ready_ranks == total_ranks:
        return SERVING
    if ever_served:
        return DEGRADED
    if scheduled_ranks:
        return STARTING
    return PENDING
