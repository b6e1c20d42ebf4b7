"""One deployment's control loop: ensure replica pods, detect faults, drive recorded recoveries,
publish status. Runs inside the deployment's kopf daemon.

The loop's state that must survive the operator lives in the deployment's status (loopstate.py):
`inFlight` (one recovery record per replica, record.py), `sidecarGroups`, `recentRecoveries`.
"""

from __future__ import annotations

import time

from ghostserve.operator import detect, loopstate, publish, recover, specs, steady
from ghostserve.operator.loopstate import now_iso, parse_iso, sidecar_port, uid_of

__all__ = ["Reconciler", "now_iso", "parse_iso", "sidecar_port", "uid_of"]


class Reconciler(loopstate.LoopState):
    """One deployment's loop. `body` is kopf's live view of the resource."""

    # ---- entry point -------------------------------------------------------------------------
    async def step(self) -> float | None:
        """One pass; returns seconds until a timed re-check is needed (None: wait for a signal)."""
        try:
            spec = specs.checked(self.name, self.body.get("spec") or {})
        except specs.SpecError:
            return None  # the create/update handler reported it; nothing to run
        if self.status.get("recovery"):
            # A record of the one-pod-per-rank operator: its pods are gone with the new model.
            await self.persist(recovery=None)
        await steady.ensure(self, spec, self.rt.view.pods(self.key))
        delays = [await detect.detect(self, spec, self.rt.view.pods(self.key))]
        for replica in sorted(self.in_flight):
            delays.append(await recover.advance(self, self.in_flight[replica], spec))
        pods_now = self.rt.view.pods(self.key)
        due = time.monotonic() - self.figures_at > self.rt.config.resync_seconds
        if due or publish.figures_stale(self, pods_now):
            await publish.refresh_figures(self, spec, pods_now)
        await publish.publish(self, spec)
        waits = [d for d in delays if d is not None]
        return min(waits) if waits else None

