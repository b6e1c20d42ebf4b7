"""`ghostserve <command> [args]`: each command lives in its component and is imported only when run,
so `ghostserve sidecar` never loads torch and `ghostserve operator` never loads the codecs."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

# command -> (module with `main(argv: list[str]) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("ghostserve.cluster.demo", "the embedded-cluster demo: GPU faults mid-decode, identical output"),
    "codec-demo": ("ghostserve.kernels.demo", "encode KV-shaped tensors, destroy shards, rebuild them"),
    "sidecar": ("ghostserve.sidecar.server", "run the node-local sidecar (gRPC)"),
    "operator": ("ghostserve.operator.main", "run the Kubernetes operator (kopf)"),
    "cluster": ("ghostserve.cluster.main", "run the embedded cluster: API, GPU nodes, sidecars, operator"),
    "gateway": ("ghostserve.gateway.server", "resume gateway: client streams survive a backend failure"),
    "serve": ("ghostserve.engine.reference.serve", "serve the reference engine over HTTP (sglang-style)"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: ghostserve <command> [args...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Run `ghostserve <command> --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ghostserve: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
