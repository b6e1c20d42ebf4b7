"""Resume gateway: an HTTP proxy that keeps client streams alive across a backend restart."""
