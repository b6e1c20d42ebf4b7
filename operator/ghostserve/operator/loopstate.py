"""The state of one deployment's control loop and how it persists it (the steps live in steady.py,
detect.py, recover.py and publish.py; reconcile.py runs them).

The loop's state that must survive the operator lives in the deployment's status (written before
anything depends on it): `inFlight` (one recovery record per replica, record.py), `sidecarGroups`
(which node's sidecar holds which replica's group, with the settings hash it was created with),
`recentRecoveries`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

import kopf
from ghostserve.operator import (
    pods,
    record,
    runtime,
    sidecars,
    specs,
    stamps,
)

now_iso, parse_iso = stamps.now_iso, stamps.parse_iso  # re-exported: handlers and tests use them
uid_of = pods.uid_of


def sidecar_port(spec: Mapping[str, Any]) -> int:
    """{port} of the sidecar address template (the chart may fix the port in the template itself)."""
    return int((spec.get("sidecar") or {}).get("port") or 7443)


class LoopState:
    """State of one deployment's loop. `body` is kopf's live view of the resource."""

    def __init__(self, rt: runtime.Runtime, body: kopf.Body, logger: logging.Logger | kopf.Logger) -> None:
        self.rt, self.body, self.log = rt, body, logger
        self.namespace = str(body["metadata"]["namespace"])
        self.name = str(body["metadata"]["name"])
        self.key = (self.namespace, self.name)
        # Fields this loop writes: the local copy is authoritative (the watch echo may lag).
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.in_flight: dict[int, record.Recovery] = record.in_flight(self.status.get("inFlight"))
        self.gave_up: str | None = None
        # The level-based status last written by this loop; None: nothing yet, compare with the stored one.
        self.published: dict[str, Any] | None = None
        self.service_ensured = False  # the client Service was checked by this loop (its first pass)
        # replica -> (node asked, figures or None when the sidecar did not answer)
        self.figures: dict[int, tuple[str, sidecars.GroupFigures | None]] = {}
        self.figures_at = 0.0
        self.kubelet_seen: dict[str, int] = {}  # pod UID -> container restarts already accounted for
        self.warned: set[str] = set()  # one Event per distinct problem, not one per pass
        self.first_seen: dict[str, float] = {}  # pod UID -> when a process-only fault was first seen
        self.tries: dict[str, int] = {}  # failed attempts of best-effort sidecar calls outside recoveries
        self.gateway_requested = False  # created (or found existing) and not yet seen by the pod watch

    async def persist(self, **fields: Any) -> None:
        """Merge-patch status fields. Values are never null except to delete a whole top-level field
        on purpose; records go in as complete lists (a merge patch replaces lists as a whole)."""
        await self.rt.kube.patch_status(self.namespace, self.name, fields)
        for k, v in fields.items():
            if v is None:
                self.status.pop(k, None)
            else:
                self.status[k] = copy.deepcopy(v)  # later edits of `v` must not alias what was published

    async def save(self, rec: record.Recovery | None = None, *, drop: int | None = None, **more: Any) -> None:
        """Write the in-flight records (with `rec` updated, or replica `drop` removed) and `more`."""
        if rec is not None:
            self.in_flight[rec.replica] = rec
        if drop is not None:
            self.in_flight.pop(drop, None)
        await self.persist(inFlight=[self.in_flight[r].to_dict() for r in sorted(self.in_flight)], **more)

    def adopted(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kopf.adopt(manifest, owner=self.body)
        return manifest

    def warn_once(self, key: str, reason: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            kopf.warn(self.body, reason=reason, message=message)

    def port(self, spec: Mapping[str, Any]) -> int:
        return sidecar_port(spec)

    def address(self, node: str, spec: Mapping[str, Any]) -> str:
        return self.rt.sidecar_address(node, sidecar_port(spec))

    def group_id(self, replica: int) -> str:
        return specs.sidecar_group_id(self.namespace, self.name, replica)

    def uuid_ranks(self, replica: int, node: str | None) -> dict[str, int]:
        """GPU UUID -> rank of the replica's group, as its sidecar on `node` reported them."""
        asked, figures = self.figures.get(replica, ("", None))
        if figures is None or asked != node:
            return {}
        return {uuid: rank for rank, uuid in figures.device_uuids.items() if uuid}
