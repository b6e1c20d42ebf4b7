"""Prometheus metrics of the operator (served by `ghostserve operator --metrics-port`)."""

from __future__ import annotations

import prometheus_client

FAULTS = prometheus_client.Counter(
    "ghostserve_operator_faults_total", "Faults detected on rank pods", ["kind", "reason"]
)
RECOVERIES = prometheus_client.Counter(
    "ghostserve_operator_recoveries_total", "Recoveries finished", ["kind", "outcome"]
)
TIME_TO_RECOVER = prometheus_client.Histogram(
    "ghostserve_operator_time_to_recover_seconds",
    "Fault detected to serving again",
    ["kind"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
BYTES_REBUILT = prometheus_client.Counter(
    "ghostserve_operator_bytes_rebuilt_total", "KV bytes rebuilt by sidecars during recoveries"
)
IN_FLIGHT = prometheus_client.Gauge(
    "ghostserve_operator_recoveries_in_flight", "Recoveries started and not finished"
)
