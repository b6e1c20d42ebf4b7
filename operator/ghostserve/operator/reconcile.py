"""One deployment's control loop: ensure replica pods, detect faults, drive recorded recoveries,
publish status. Runs inside the deployment's kopf daemon.

The loop's state that must survive the operator lives in the deployment's status (loopstate.py):
`inFlight` (one recovery record per replica, record.py), `sidecarGroups`, `recentRecoveries`.
"""

from __future__ import annotations

import time
from typing import Any

from ghostserve.operator import detect, firstpass, loopstate, publish, recover, specs, steady
from ghostserve.operator.loopstate import now_iso, parse_iso, sidecar_port, uid_of

__all__ = ["Reconciler", "now_iso", "parse_iso", "sidecar_port", "uid_of"]


class Reconciler(loopstate.LoopState):
    """One deployment's loop. `body` is kopf's live view of the resource."""

    _urgency_spec: tuple[Any, dict[str, Any]] | None = None  # (resourceVersion, checked spec) for urgent()

    def urgent(self) -> bool:
        """Whether this deployment's first pass jumps the queue (firstpass.py): a recovery recorded in
        its status or a fault in the view. No API call; opens its nodes' sidecar health streams, whose
        replayed GPU faults can make it urgent while it waits."""
        version = (self.body.get("metadata") or {}).get("resourceVersion")
        cached = self._urgency_spec
        if cached is None or cached[0] != version:  # checked once per version of the object, not per wake-up
            try:
                cached = (version, specs.checked(self.name, self.body.get("spec") or {}))
            except specs.SpecError:
                return False
            self._urgency_spec = cached
        spec = cached[1]
        try:
            pods = self.rt.view.pods(self.key)
            steady.watch_health(self, spec, pods)
            return firstpass.is_urgent(self.status, faulted=detect.faulted(self, spec, pods))
        except Exception as exc:  # never hold a deployment back on a bug here: run its pass now
            self.log.warning("first-pass-urgency-failed", extra={"error": repr(exc)})
            return True

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
        await steady.ensure_service(self)  # after the recoveries: their steps need not wait for it
        pods_now = self.rt.view.pods(self.key)
        due = time.monotonic() - self.figures_at > self.rt.config.resync_seconds
        if due or publish.figures_stale(self, pods_now):
            await publish.refresh_figures(self, spec, pods_now)
        await publish.publish(self, spec)
        waits = [d for d in delays if d is not None]
        return min(waits) if waits else None

