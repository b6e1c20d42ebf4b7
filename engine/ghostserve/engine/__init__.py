"""ghostserve.engine."""
