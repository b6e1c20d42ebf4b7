"""GhostServe's plugin for sglang 0.5.23 (the only package that imports sglang).

Registered on the entry point group `sglang.srt.plugins` as `ghostserve`
(`ghostserve.engine.sglang.plugin:register`); enabled in a deployment with GHOSTSERVE_SGLANG=1.
Modules: settings (environment), compat (version check), chunks (pure chunk bookkeeping), capture
(what a forward pass wrote), pools (layout and custody of sglang's KV pool), survivors (reaction to a
peer failure), resume (radix-cache insertion and pins), protector (per-request commits, releases and
resumed requests), lifecycle (detach when the process tree goes down), metrics (counters), runtime
(hook bodies), plugin (entry).
See docs/sglang.md.
"""
