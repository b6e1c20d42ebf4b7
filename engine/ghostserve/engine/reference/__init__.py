"""The CPU reference engine: a small tensor-parallel LLaMA-style decoder whose KV lives in sidecar pools.

Modules: ``config`` (model shape and TP sharding), ``model`` (weights and the batch-invariant forward),
``kvpool`` (pool views and the page allocator), ``schedule`` (replay of chunk boundaries), ``rank``
(one TP rank process), ``commits`` (a rank's background commit sender), ``cluster`` (spawns and tears
down the rank processes), ``engine`` (continuous batching, fault injection, replay), ``recovery``
(restart, plan, rebuild ‖ recompute), ``workload`` (request sets, Poisson arrivals) and ``harness``
(run a workload against a sidecar and collect outputs and KV digests).
"""
