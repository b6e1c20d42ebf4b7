"""One deployment's control loop: ensure pods, detect faults, drive recorded recoveries, publish status.

Runs inside the deployment's kopf daemon. Every recovery step is written to `status.recovery`
before the next one starts, so a restarted operator resumes from the recorded step; steps are
idempotent (delete by UID precondition, create with "already exists" = done, sidecar calls that
treat an unknown group as nothing to do).
"""

from __future__ import annotations

import copy
import datetime
import logging
import time
import uuid
from collections.abc import Mapping
from typing import Any

import kopf
from ghostserve.operator import faults, metrics, remediation, runtime, sidecars, specs, status

SIDECAR_ATTEMPTS = 3  # a sidecar step failing this often is skipped: the rank recomputes instead


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _uid(pod: Mapping[str, Any] | None) -> str | None:
    return ((pod or {}).get("metadata") or {}).get("uid")


class Reconciler:
    """State of one deployment's loop. `body` is kopf's live view of the resource."""

    def __init__(self, rt: runtime.Runtime, body: kopf.Body, logger: logging.Logger | kopf.Logger) -> None:
        self.rt, self.body, self.log = rt, body, logger
        self.namespace = str(body["metadata"]["namespace"])
        self.name = str(body["metadata"]["name"])
        self.key = (self.namespace, self.name)
        # Fields this loop writes: the local copy is authoritative (the watch echo may lag).
        self.status: dict[str, Any] = dict(body.get("status") or {})
        self.gave_up: str | None = None
        self.published: dict[str, Any] = {}
        self.figures: dict[int, sidecars.GroupFigures] = {}
        self.figures_at = 0.0
        self.kubelet_seen: dict[str, int] = {}  # pod UID -> container restarts already accounted for

    # ---- entry point -------------------------------------------------------------------------
    async def step(self) -> float | None:
        """One pass; returns seconds until a timed re-check is needed (None: wait for a signal)."""
        try:
            spec = specs.checked(self.name, self.body.get("spec") or {})
        except specs.SpecError:
            return None  # the create/update handler reported it; nothing to run
        pods = self.rt.view.pods(self.key)
        record = self.status.get("recovery")
        delay: float | None
        if record:
            delay = await self.advance(dict(record), spec)
        else:
            await self.ensure(spec, pods)
            delay = await self.detect(spec, self.rt.view.pods(self.key))
        if time.monotonic() - self.figures_at > self.rt.config.resync_seconds:
            await self.refresh_figures(spec, pods)
        await self.publish(spec)
        return delay

    async def persist(self, **fields: Any) -> None:
        await self.rt.kube.patch_status(self.namespace, self.name, fields)
        for k, v in fields.items():
            if v is None:
                self.status.pop(k, None)
            else:
                self.status[k] = copy.deepcopy(v)  # later edits of `v` must not alias what was published

    def _adopted(self, manifest: dict[str, Any]) -> dict[str, Any]:
        kopf.adopt(manifest, owner=self.body)
        return manifest

    # ---- steady state ------------------------------------------------------------------------
    async def ensure(self, spec: Mapping[str, Any], pods: Mapping[tuple[int, int], Any]) -> None:
        """Create missing rank pods; delete pods of removed groups/ranks; roll one stale group at a time."""
        wanted = specs.desired_ranks(spec)
        for group, rank in wanted:
            if (group, rank) not in pods:
                pod = specs.build_rank_pod(
                    self.namespace,
                    self.name,
                    spec,
                    group=group,
                    rank=rank,
                    node_access=self.rt.config.node_access,
                )
                await self.rt.kube.create_pod(self.namespace, self._adopted(pod))
        removed: dict[int, set[str]] = {}  # groups scaled away -> nodes whose sidecar held them
        for slot, pod in pods.items():
            if slot not in set(wanted):
                await self.rt.kube.delete_pod(self.namespace, pod["metadata"]["name"], uid=_uid(pod))
                if slot[0] >= spec["engine"]["replicas"]:
                    removed.setdefault(slot[0], set()).add((pod.get("spec") or {}).get("nodeName") or "")
        for group, nodes in sorted(removed.items()):
            await self._release_group(group, nodes, spec["sidecar"]["port"])
        for pod in pods.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node:
                self.rt.ensure_health_watch(node, spec["sidecar"]["port"], self.on_gpu_fault)
        current = specs.spec_hash(spec)
        if all(status.pod_ready(pods.get(s)) for s in wanted):
            stale = sorted(
                {
                    g
                    for (g, _), p in pods.items()
                    if p["metadata"].get("annotations", {}).get(specs.SPEC_HASH_ANNOTATION) != current
                }
            )
            if stale:
                self.log.info(f"Rolling group {stale[0]} to spec {current}")
                for (g, _), pod in pods.items():
                    if g == stale[0]:
                        await self.rt.kube.delete_pod(self.namespace, pod["metadata"]["name"], uid=_uid(pod))

    async def _release_group(self, group: int, nodes: set[str], port: int) -> None:
        """Free a removed group's KV and parity on its sidecars (best effort: a dead sidecar lost them)."""
        gid = specs.sidecar_group_id(self.namespace, self.name, group)
        for node in sorted(n for n in nodes if n):
            try:
                await self.rt.sidecars.delete_group(self.rt.sidecar_address(node, port), gid)
            except Exception as exc:
                kopf.warn(self.body, reason="SidecarError", message=f"DeleteGroup {gid} on {node}: {exc}")

    def on_gpu_fault(self, fault: faults.Fault) -> None:
        self.rt.view.put_gpu_fault(fault)
        for key in self.rt.view.deployments_on(fault.node or ""):
            self.rt.wake(key)

    async def detect(self, spec: Mapping[str, Any], pods: Mapping[tuple[int, int], Any]) -> float | None:
        """Classify every rank; start a recovery for the lowest faulty group. Returns a backoff delay."""
        found: dict[int, list[tuple[int, faults.Fault]]] = {}
        for (group, rank), pod in sorted(pods.items()):
            node = (pod.get("spec") or {}).get("nodeName")
            fault = faults.rank_fault(
                pod,
                self.rt.view.node(node),
                self.rt.view.gpu_faults(node),
                known_restarts=self.kubelet_seen.setdefault(_uid(pod) or "", status.pod_restarts(pod)),
                gpu_conditions=self.rt.config.gpu_conditions,
                node_deleted=self.rt.view.node_deleted(node),
            )
            if fault is not None:
                found.setdefault(group, []).append((rank, fault))
        if not found:
            self.gave_up = None
            return None
        group = min(found)
        fault = faults.worst(f for _, f in found[group])
        assert fault is not None
        rec = spec["recovery"]
        now = datetime.datetime.now(datetime.UTC).timestamp()
        recent = [
            t for t in (parse_iso(s) for s in self.status.get("recentRecoveries") or []) if t is not None
        ]
        decision = remediation.decide(
            fault,
            recent_recoveries=recent,
            now=now,
            max_per_hour=rec["maxRecoveriesPerHour"],
            last_finished=parse_iso((self.status.get("lastRecovery") or {}).get("recoveredAt")),
            backoff_seconds=rec["backoffSeconds"],
        )
        if decision.action == remediation.GIVE_UP:
            if self.gave_up is None:
                kopf.warn(
                    self.body,
                    reason="RecoveryBudgetExhausted",
                    message=f"{fault.message}; {decision.message}",
                )
            self.gave_up = decision.message
            return None
        if decision.action == remediation.WAIT:
            return decision.delay
        ranks = remediation.affected_ranks(
            [r for r, _ in found[group]],
            policy=rec["faultPolicy"],
            world_size=spec["engine"]["tensorParallel"],
        )
        old = {r: u for r in ranks if (u := _uid(pods.get((group, r))))}
        for r, u in old.items():
            self.kubelet_seen[u] = status.pod_restarts(pods.get((group, r)))
        protected = spec["protection"]["enabled"] and spec["protection"]["code"] != "none"
        record = remediation.plan_recovery(
            fault,
            decision,
            group=group,
            ranks=ranks,
            old_pods=old,
            protected=protected,
            detected_at=now_iso(),
            recovery_id=uuid.uuid4().hex[:12],
        )
        metrics.FAULTS.labels(fault.kind, fault.reason).inc()
        metrics.IN_FLIGHT.inc()
        kopf.warn(
            self.body,
            reason=f"Fault{fault.kind.title()}",
            message=f"group {group} ranks {ranks}: {fault.reason}: {fault.message} -> {decision.action}",
        )
        if fault.node and fault.gpu:
            self.rt.view.clear_gpu(fault.node, fault.gpu)  # acted on; the replacement avoids that GPU
        recent_iso = [
            s for s in self.status.get("recentRecoveries") or [] if (parse_iso(s) or 0) > now - 3600
        ]
        await self.persist(recovery=record, recentRecoveries=[*recent_iso, record["detectedAt"]])
        return await self.advance(record, spec)

    # ---- recovery ----------------------------------------------------------------------------
    async def advance(self, record: dict[str, Any], spec: Mapping[str, Any]) -> float | None:
        """Run the recorded recovery's remaining steps; returns when it must wait for pods or is done."""
        group, ranks = int(record["group"]), [int(r) for r in record["ranks"]]
        gid = specs.sidecar_group_id(self.namespace, self.name, group)
        old_uids = set((record.get("oldPods") or {}).values())
        port = spec["sidecar"]["port"]
        while True:
            step = remediation.next_step(record)
            pods = self.rt.view.pods(self.key)
            if step == remediation.MARKED_LOST and record.get("node"):
                done, _ = await self._sidecar_step(
                    record,
                    "markLost",
                    self.rt.sidecars.mark_lost(
                        self.rt.sidecar_address(record["node"], port), gid, ranks, record["reason"]
                    ),
                )
                if not done:
                    return 1.0
            elif step == remediation.PODS_DELETED:
                for r in ranks:
                    uid = (record.get("oldPods") or {}).get(str(r))
                    if uid and _uid(pods.get((group, r))) == uid:
                        await self.rt.kube.delete_pod(
                            self.namespace, specs.rank_pod_name(self.name, group, r), uid=uid
                        )
            elif step == remediation.REPLACEMENTS_CREATED:
                for r in ranks:
                    pod = pods.get((group, r))
                    if pod is not None and _uid(pod) not in old_uids:
                        continue  # created by an earlier attempt
                    manifest = specs.build_rank_pod(
                        self.namespace,
                        self.name,
                        spec,
                        group=group,
                        rank=r,
                        avoid_nodes=record["avoidNodes"],
                        avoid_gpus=record["avoidGpus"],
                        pin_node=record["pinNode"],
                        prefer_node=record["preferNode"],
                        node_access=self.rt.config.node_access,
                    )
                    created = await self.rt.kube.create_pod(self.namespace, self._adopted(manifest))
                    if not created and pod is not None:
                        return None  # the failed pod is still terminating: its DELETED event wakes us
                record["replacedAt"] = now_iso()
            elif step == remediation.RUNNING:
                state = self._replacements(pods, group, ranks, old_uids)
                if state == "failed":
                    return await self.finish(record, "Failed", spec)
                if state == "waiting":
                    elapsed = datetime.datetime.now(datetime.UTC).timestamp() - (
                        parse_iso(record["detectedAt"]) or 0
                    )
                    if elapsed > self.rt.config.recovery_timeout_seconds:
                        return await self.finish(record, "Failed", spec)
                    return None
            elif step == remediation.REBUILT and record.get("node"):
                done, outcome = await self._sidecar_step(
                    record,
                    "rebuild",
                    self.rt.sidecars.plan_and_rebuild(
                        self.rt.sidecar_address(record["node"], port), gid, ranks
                    ),
                )
                if not done:
                    return 1.0
                if isinstance(outcome, sidecars.RebuildOutcome):
                    record.update(
                        bytesRebuilt=outcome.bytes_rebuilt,
                        chunksRebuilt=outcome.chunks_rebuilt,
                        chunksRecomputed=outcome.chunks_recomputed,
                    )
            elif step == remediation.DONE:
                return await self.finish(record, "Succeeded", spec)
            record["step"] = step
            record.pop("attempts", None)
            await self.persist(recovery=record)
            self.log.info(f"recovery {record['id']} of group {group} ranks {ranks}: {step}")

    async def _sidecar_step(self, record: dict[str, Any], what: str, call: Any) -> tuple[bool, Any]:
        """(done, result): not done means retry later; done with None result when skipped after failures."""
        try:
            return True, await call
        except Exception as exc:  # sidecar down: retry, then give the step up (the rank recomputes)
            record["attempts"] = int(record.get("attempts", 0)) + 1
            kopf.warn(self.body, reason="SidecarError", message=f"{what} on {record.get('node')}: {exc}")
            if record["attempts"] >= SIDECAR_ATTEMPTS:
                record[f"{what}Skipped"] = str(exc)[:200]
                return True, None
            await self.persist(recovery=record)
            return False, None

    @staticmethod
    def _replacements(
        pods: Mapping[tuple[int, int], Any], group: int, ranks: list[int], old: set[str]
    ) -> str:
        states = []
        for r in ranks:
            pod = pods.get((group, r))
            if pod is None or _uid(pod) in old:
                states.append("waiting")
            elif faults.classify_pod(pod) is not None:
                states.append("failed")
            else:
                states.append("ready" if status.pod_ready(pod) else "waiting")
        return "failed" if "failed" in states else "waiting" if "waiting" in states else "ready"

    async def finish(self, record: dict[str, Any], outcome: str, spec: Mapping[str, Any]) -> float | None:
        recovered = now_iso()
        seconds = (parse_iso(recovered) or 0) - (parse_iso(record["detectedAt"]) or 0)
        last = status.last_recovery(
            record,
            outcome=outcome,
            recovered_at=recovered,
            seconds=seconds,
            bytes_rebuilt=int(record.get("bytesRebuilt", 0)),
            chunks_rebuilt=int(record.get("chunksRebuilt", 0)),
            chunks_recomputed=int(record.get("chunksRecomputed", 0)),
        )
        rows = copy.deepcopy(self.status.get("ranks") or [])
        for row in rows:  # count the recovery on the ranks it replaced (persisted with the record's end)
            if row.get("group") == record["group"] and row.get("rank") in record["ranks"]:
                row["restarts"] = int(row.get("restarts", 0)) + 1
        await self.persist(
            recovery=None, lastRecovery=last, recoveries=int(self.status.get("recoveries", 0)) + 1, ranks=rows
        )
        metrics.IN_FLIGHT.dec()
        metrics.RECOVERIES.labels(record["kind"], outcome).inc()
        metrics.TIME_TO_RECOVER.labels(record["kind"]).observe(seconds)
        metrics.BYTES_REBUILT.inc(last["bytesRebuilt"])
        # kopf.event is not filtered by the posting level (set to WARNING for handler logs).
        kopf.event(
            self.body,
            type="Normal" if outcome == "Succeeded" else "Warning",
            reason=f"Recovery{outcome}",
            message=f"{record['kind']} fault ({record['reason']}) of group {record['group']} "
            f"ranks {record['ranks']}: {outcome} in {seconds:.2f}s, {last['bytesRebuilt']} bytes rebuilt, "
            f"{last['chunksRecomputed']} chunks recomputed",
        )
        return None

    async def refresh_figures(self, spec: Mapping[str, Any], pods: Mapping[tuple[int, int], Any]) -> None:
        """Protection figures of every group from the sidecar of its rank-0 node (best effort)."""
        self.figures_at = time.monotonic()
        for group in range(spec["engine"]["replicas"]):
            node = ((pods.get((group, 0)) or {}).get("spec") or {}).get("nodeName")
            if not node:
                continue
            address = self.rt.sidecar_address(node, spec["sidecar"]["port"])
            try:
                found = await self.rt.sidecars.describe(
                    address, specs.sidecar_group_id(self.namespace, self.name, group)
                )
            except Exception as exc:  # figures are informative; a down sidecar must not stop the loop
                self.log.debug(f"DescribeGroup on {address}: {exc}")
                continue
            if found is not None:
                self.figures[group] = found

    # ---- status ------------------------------------------------------------------------------
    async def publish(self, spec: Mapping[str, Any]) -> None:
        """Patch the level-based status when it differs from what was last written."""
        pods = self.rt.view.pods(self.key)
        recorded = {
            (r["group"], r["rank"]): int(r.get("restarts", 0)) for r in self.status.get("ranks") or []
        }
        rows = [
            status.rank_row(
                g,
                r,
                pods.get((g, r)),
                name=specs.rank_pod_name(self.name, g, r),
                recorded_restarts=recorded.get((g, r), 0),
            )
            for g, r in specs.desired_ranks(spec)
        ]
        figures = [f for f in self.figures.values()]
        protection = status.protection_summary(
            enabled=bool(spec["protection"]["enabled"]) and spec["protection"]["code"] != "none",
            protected_chunks=sum(f.protected_chunks for f in figures),
            unprotected_chunks=sum(f.unprotected_chunks for f in figures),
            parity_bytes=sum(f.parity_bytes for f in figures),
        )
        ever_served = self.status.get("phase") in {"Serving", "Recovering", "Degraded"}
        out = status.summary(
            spec_valid=True,
            rows=rows,
            recovery=self.status.get("recovery"),
            gave_up=self.gave_up,
            ever_served=ever_served,
            protection=protection,
            old_conditions=self.status.get("conditions") or [],
            generation=(self.body.get("metadata") or {}).get("generation"),
            now=now_iso(),
        )
        if out != self.published:
            await self.persist(**out)
            self.published = out
