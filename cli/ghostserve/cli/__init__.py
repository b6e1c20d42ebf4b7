"""The `ghostserve` command line: one entry point dispatching to each component's own `main`."""
