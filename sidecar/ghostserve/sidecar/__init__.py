"""ghostserve.sidecar: the node-local custodian of KV pools, parity and the request ledger.

Modules (import the one you need; nothing is re-exported, so that `client` stays light for the operator):
client (gRPC clients), pools (shared-memory pools, `map_pool`), transfer (write a rebuild stream into a
pool), server (`ghostserve sidecar`), service (servicer), core (custodian), restore (start-up),
recovery (plan/rebuild/stream), coding (encode/rebuild one chunk), ledger, store (parity budget),
workqueue, planner (hybrid recovery plan), persist (state, journal, spill), group, convert, health,
metrics, logs, config, errors. Checksums, codes and protection settings come from ghostserve.kernels.
"""
