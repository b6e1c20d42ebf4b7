"""ghostserve.sidecar."""
