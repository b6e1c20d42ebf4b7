"""Resume gateway: an HTTP proxy that keeps client streams alive across a backend restart.

Modules: requests (client requests -> one Job), progress (output across attempts), render (native and
OpenAI shapes), upstream (HTTP to one backend), backends (which backend, bounded waiting), discovery
(backends from Kubernetes), relay (the resume loop), server (aiohttp app and `ghostserve gateway`).
See docs/gateway.md.
"""
