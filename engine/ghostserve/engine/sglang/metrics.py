"""The plugin's counters (prometheus_client; they appear in sglang's /metrics with --enable-metrics,
which collects every scheduler process's metrics through PROMETHEUS_MULTIPROC_DIR)."""

from __future__ import annotations

import prometheus_client

UNPROTECTED = prometheus_client.Counter(
    "ghostserve_sglang_unprotected_requests",
    "Requests served without protection after the sidecar rejected one of their calls",
    ["reason"],
)
PROTECTION_OFF = prometheus_client.Counter(
    "ghostserve_sglang_protection_off",
    "Times this scheduler process turned protection off for every request (pool changed, hook error)",
)
RESTORED = prometheus_client.Counter(
    "ghostserve_sglang_restored_requests", "Requests whose KV was restored into the radix cache"
)
