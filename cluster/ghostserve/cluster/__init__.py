"""Embedded cluster: an API emulator, node agents that run pods as local processes, a sidecar per node,
fake NVML and a device-plugin stand-in. Only the CLI and tests import it."""
