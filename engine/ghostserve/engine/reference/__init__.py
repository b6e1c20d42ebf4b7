"""The CPU reference engine: a small tensor-parallel LLaMA-style decoder whose KV lives in sidecar pools.

Modules: ``config`` (model shape and TP sharding), ``model`` (weights and the batch-invariant forward),
``kvpool`` (pool views and the page allocator), ``schedule`` (replay of chunk boundaries), ``rank``
(one TP rank process), ``cluster`` (spawns and tears down the rank processes), ``engine`` (continuous
batching, chunk commits, fault recovery) and ``workload`` (request sets and Poisson arrivals).
"""
