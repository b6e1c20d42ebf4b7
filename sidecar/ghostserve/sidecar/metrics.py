"""Prometheus metrics of one sidecar, in their own registry (several sidecars can live in one test
process). Served over HTTP by `server` when --metrics-port is given."""

from __future__ import annotations

import prometheus_client as prom


class Metrics:
    def __init__(self) -> None:
        self.registry = prom.CollectorRegistry()
        r = self.registry
        self.parity_bytes = prom.Gauge(
            "ghostserve_parity_bytes_held", "Parity bytes held in host memory", registry=r
        )
        self.parity_budget = prom.Gauge("ghostserve_parity_budget_bytes", "Parity byte budget", registry=r)
        self.pool_bytes = prom.Gauge("ghostserve_pool_bytes_held", "KV pool bytes held", registry=r)
        self.chunks_protected = prom.Counter(
            "ghostserve_chunks_protected", "Chunks whose parity was written", registry=r
        )
        self.chunks_unprotected = prom.Counter(
            "ghostserve_chunks_unprotected",
            "Chunks left unprotected",
            ["reason"],
            registry=r,
        )
        self.evictions = prom.Counter(
            "ghostserve_parity_evictions", "Chunks whose parity was evicted", registry=r
        )
        self.encode_seconds = prom.Histogram(
            "ghostserve_encode_seconds",
            "Seconds to encode one chunk",
            registry=r,
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        )
        self.encode_bytes = prom.Counter("ghostserve_encode_bytes", "KV bytes encoded", registry=r)
        self.rebuild_seconds = prom.Histogram(
            "ghostserve_rebuild_seconds",
            "Seconds to rebuild one chunk",
            registry=r,
            buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
        )
        self.rebuild_bytes = prom.Counter("ghostserve_rebuild_bytes", "Lost-shard bytes rebuilt", registry=r)
        self.health_events = prom.Counter(
            "ghostserve_health_events", "GPU health events", ["kind"], registry=r
        )

    def exposition(self) -> bytes:
        return bytes(prom.generate_latest(self.registry))
