"""`ghostserve operator`: run the kopf operator with GhostServe's settings."""

from __future__ import annotations

import argparse
import logging
import threading
from collections.abc import Sequence

import kopf
import prometheus_client
from ghostserve.operator import faults, runtime, sidecars, specs


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve operator", description=__doc__)
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "-n", "--namespace", action="append", default=[], help="serve this namespace (repeatable)"
    )
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="serve every namespace")
    p.add_argument(
        "--sidecar-address-template",
        default="{node_ip}:{port}",
        help="how to reach a node's sidecar: {node}, {node_ip}, {port}; or unix:///path",
    )
    p.add_argument("--tls-ca", help="CA bundle that signed the sidecars' certificates (enables mTLS)")
    p.add_argument("--tls-cert", help="operator client certificate for mTLS")
    p.add_argument("--tls-key", help="operator client key for mTLS")
    p.add_argument("--tls-server-name", help="expected sidecar certificate name (SNI override)")
    p.add_argument(
        "--gpu-condition",
        action="append",
        default=[],
        help="node condition type meaning a broken GPU (repeatable; default: a built-in set)",
    )
    p.add_argument(
        "--sidecar-socket-group",
        type=int,
        default=2000,
        help="group of the sidecar socket directory, added to rank pods' supplementalGroups (-1: none)",
    )
    p.add_argument(
        "--sidecar-shm-dir",
        default="/dev/shm/ghostserve",
        help="host directory of the sidecar's CPU KV pools, mounted at /dev/shm in rank pods ('' = none)",
    )
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--resync-seconds", type=float, default=30.0)
    p.add_argument("--recovery-timeout-seconds", type=float, default=900.0)
    p.add_argument("--no-health-watch", action="store_true", help="do not stream sidecar GPU health")
    p.add_argument("--log-format", choices=["json", "plain"], default="json")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(list(argv))
    tls_parts = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(tls_parts) and not all(tls_parts):
        p.error("--tls-ca, --tls-cert and --tls-key go together")
    if not args.namespace and not args.all_namespaces:
        p.error("give --namespace NS (repeatable) or --all-namespaces")
    return args


def config_from(args: argparse.Namespace) -> runtime.Config:
    tls = (
        sidecars.TLSFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        if args.tls_ca
        else None
    )
    return runtime.Config(
        sidecar_address_template=args.sidecar_address_template,
        tls=tls,
        gpu_conditions=frozenset(args.gpu_condition) or faults.DEFAULT_GPU_CONDITIONS,
        resync_seconds=args.resync_seconds,
        recovery_timeout_seconds=args.recovery_timeout_seconds,
        watch_health=not args.no_health_watch,
        node_access=specs.NodeAccess(
            socket_group=None if args.sidecar_socket_group < 0 else args.sidecar_socket_group,
            shm_dir=args.sidecar_shm_dir or None,
        ),
    )


def main(argv: Sequence[str], *, stop_flag: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop_flag`); returns the exit status."""
    args = parse_args(argv)
    from ghostserve.operator import handlers  # registers the handlers  # noqa: F401

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    logging.getLogger("ghostserve").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        standalone=True,
        liveness_endpoint=args.liveness,
        memo=kopf.Memo(config=config_from(args)),
        stop_flag=stop_flag,
    )
    return 0
