"""ghostserve.operator."""
