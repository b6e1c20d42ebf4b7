"""`ghostserve operator`: run the kopf operator with GhostServe's settings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence

import kopf
import prometheus_client
from ghostserve.operator import faults, firstpass, kube, leader, podpolicy, runtime, sidecars, specs
from ghostserve.wire import logs

log = logging.getLogger("ghostserve.operator")


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
    p.add_argument(
        "--sidecar-socket-dir",
        default="/run/ghostserve",
        help="host directory of the sidecar socket, mounted at /run/ghostserve in rank pods",
    )
    p.add_argument(
        "--sidecar-port", type=int, default=7443, help="every node's sidecar TCP port ({port})"
    )
    p.add_argument(
        "--rank-run-as-user", type=int, default=65532, help="non-root UID of rank pods that set none"
    )
    p.add_argument(
        "--allow-root-ranks", action="store_true", help="let rank pods run as the image's user, root included"
    )
    p.add_argument("--leader-elect", action="store_true", help="run kopf only while holding a Lease (HA)")
    p.add_argument("--leader-namespace", default=os.environ.get("POD_NAMESPACE", "default"))
    p.add_argument("--leader-lease-name", default="ghostserve-operator")
    p.add_argument("--leader-lease-seconds", type=float, default=15.0)
    p.add_argument("--leader-renew-deadline-seconds", type=float, default=10.0)
    p.add_argument("--leader-retry-seconds", type=float, default=2.0)
    p.add_argument("--metrics-port", type=int, default=0, help="Prometheus metrics port (0: off)")
    p.add_argument("--liveness", default=None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    p.add_argument("--resync-seconds", type=float, default=30.0)
    p.add_argument("--recovery-timeout-seconds", type=float, default=900.0)
    p.add_argument(
        "--first-pass-limit",
        type=int,
        default=firstpass.DEFAULT_LIMIT,
        help="healthy deployments whose first pass runs at once after a start (faulty ones never wait)",
    )
    p.add_argument("--no-health-watch", action="store_true", help="do not stream sidecar GPU health")
    p.add_argument("--log-format", choices=["json", "plain"], default="json")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(list(argv))
    tls_parts = [args.tls_ca, args.tls_cert, args.tls_key]
    if any(tls_parts) and not all(tls_parts):
        p.error("--tls-ca, --tls-cert and --tls-key go together")
    if not args.namespace and not args.all_namespaces:
        p.error("give --namespace NS (repeatable) or --all-namespaces")
    if not all(d.startswith("/") for d in (args.sidecar_socket_dir, args.sidecar_shm_dir) if d):
        p.error("--sidecar-socket-dir and --sidecar-shm-dir must be absolute paths")
    if not 1 <= args.sidecar_port <= 65535:
        p.error("--sidecar-port must be in [1, 65535]")
    if args.first_pass_limit < 1:
        p.error("--first-pass-limit must be >= 1")
    if args.rank_run_as_user <= 0 and not args.allow_root_ranks:
        p.error("--rank-run-as-user must be a non-root UID (or pass --allow-root-ranks)")
    return args


def config_from(args: argparse.Namespace) -> runtime.Config:
    tls = (
        sidecars.TLSFiles(args.tls_ca, args.tls_cert, args.tls_key, args.tls_server_name)
        if args.tls_ca
        else None
    )
    return runtime.Config(
        # The port comes from the chart, never from a CR: it is fixed into the template here.
        sidecar_address_template=args.sidecar_address_template.replace("{port}", str(args.sidecar_port)),
        tls=tls,
        gpu_conditions=frozenset(args.gpu_condition) or faults.DEFAULT_GPU_CONDITIONS,
        resync_seconds=args.resync_seconds,
        recovery_timeout_seconds=args.recovery_timeout_seconds,
        first_pass_limit=args.first_pass_limit,
        watch_health=not args.no_health_watch,
        node_access=specs.NodeAccess(
            socket_group=None if args.sidecar_socket_group < 0 else args.sidecar_socket_group,
            shm_dir=args.sidecar_shm_dir or None,
        ),
    )


def policy_from(args: argparse.Namespace) -> podpolicy.Policy:
    return podpolicy.Policy(
        socket_dir=args.sidecar_socket_dir,
        shm_dir=args.sidecar_shm_dir or None,
        run_as_user=args.rank_run_as_user,
        allow_root=args.allow_root_ranks,
    )


class Campaign:
    """Leader election in a thread of its own (kopf owns the main thread's event loop): `won` is set
    once this process holds the Lease; losing it afterwards ends the process at once."""

    def __init__(self, settings: leader.Settings) -> None:
        self.settings = settings
        self.won = threading.Event()
        self.done = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._elector: leader.Elector | None = None
        self.thread = threading.Thread(target=asyncio.run, args=(self._run(),), name="leader", daemon=True)

    async def _run(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        api = kube.Kube(await kube.connect())
        elector = self._elector = leader.Elector(api, self.settings)
        try:
            await elector.acquire()
            self.won.set()
            holding = asyncio.create_task(elector.hold())
            stopping = asyncio.create_task(self._stop.wait())
            await asyncio.wait({holding, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if holding.done():
                # Another replica may act from now on: stop at once rather than after a graceful shutdown.
                log.critical("leader-lease-lost", extra={"action": "exit: only the new leader acts"})
                logging.shutdown()
                os._exit(1)
            holding.cancel()
            await elector.release()
        finally:
            await api.close()
            self.done.set()

    def is_current(self) -> bool:
        """For kube.Kube.fence: writes are allowed only while the Lease is freshly renewed."""
        return self._elector is not None and self._elector.is_current()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self.done.wait(timeout=10)


def main(argv: Sequence[str], *, stop_flag: threading.Event | None = None) -> int:
    """Run until SIGTERM/SIGINT (or `stop_flag`); returns the exit status."""
    args = parse_args(argv)
    from ghostserve.operator import handlers  # registers the handlers  # noqa: F401

    kopf.configure(
        verbose=args.verbose,
        log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    if args.log_format == "json":  # the one GhostServe log format (docs/design.md §10), kopf's records too
        logs.setup("DEBUG" if args.verbose else "INFO")
    logging.getLogger("ghostserve").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    campaign = None
    if args.leader_elect:
        identity = f"{os.environ.get('POD_NAME') or socket.gethostname()}-{uuid.uuid4().hex[:6]}"
        campaign = Campaign(
            leader.Settings(
                namespace=args.leader_namespace,
                name=args.leader_lease_name,
                identity=identity,
                lease=args.leader_lease_seconds,
                deadline=args.leader_renew_deadline_seconds,
                retry=args.leader_retry_seconds,
            )
        )
        log.info("leader-election-waiting", extra={"identity": identity, "lease": args.leader_lease_name})
        campaign.thread.start()
        while not campaign.won.wait(timeout=0.5):  # a follower stays up (and restartable) until it wins
            if stop_flag is not None and stop_flag.is_set():
                campaign.stop()
                return 0
    try:
        kopf.run(
            clusterwide=args.all_namespaces,
            namespaces=args.namespace,
            # One operator at a time is guaranteed by the Lease (or the chart's single replica), not by
            # kopf's peering, which only pauses a lower-priority operator once it has noticed it.
            standalone=True,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(
                config=config_from(args),
                policy=policy_from(args),
                fence=campaign.is_current if campaign is not None else None,
            ),
            stop_flag=stop_flag,
        )
    finally:
        if campaign is not None:
            campaign.stop()
    return 0
