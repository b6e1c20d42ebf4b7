"""ghostserve.kernels."""
