"""`ghostserve sidecar`: the node-local gRPC server.

`create_server(address, *, config)` builds a server without starting it (tests bind port 0 or a temporary
socket); `serve()` runs one until SIGTERM/SIGINT; `main(argv)` is the CLI. Shutdown is graceful: health
goes NOT_SERVING, then `server.stop(grace)` lets calls in flight finish, then pools are freed (or kept
with --keep-pools).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import os
import pathlib
import signal
import socket
import sys
from collections.abc import Sequence

import grpc
import grpc.aio
import prometheus_client as prom
from ghostserve.sidecar import (
    authz,
    config,
    core,
    errors,
    flags,
    health,
    logs,
    metrics,
    peercred,
    restore,
    rpc,
    service,
)
from grpc_health.v1 import health as grpc_health
from grpc_health.v1 import health_pb2, health_pb2_grpc

log = logging.getLogger("ghostserve.sidecar")
SERVICE_NAME = "ghostserve.v1.Sidecar"


@dataclasses.dataclass(frozen=True)
class Tls:
    """PEM file paths; with `ca`, clients must present a certificate signed by it (mutual TLS)."""

    cert: pathlib.Path
    key: pathlib.Path
    ca: pathlib.Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.ca.read_bytes() if self.ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )

    def peer_credentials(self) -> grpc.ChannelCredentials:
        """What this sidecar presents when it dials another one (MoveGroup): its own certificate,
        and the CA (when given) as the root the peer's certificate must chain to."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes(),
            certificate_chain=self.cert.read_bytes(),
        )


DEFAULT_SOCKET = flags.DEFAULT_SOCKET


@dataclasses.dataclass(frozen=True)
class Security:
    """Who may call (authz.Policy) and how much a call may cost (message size, calls at once, decoded
    bytes in flight)."""

    policy: authz.Policy
    limits: rpc.Limits = dataclasses.field(default_factory=rpc.Limits)
    max_concurrent_rpcs: int = 64

    def options(self) -> list[tuple[str, int]]:
        # Sends may be as large as the client allows (StreamRebuild pieces, moves): 16 MiB.
        return [
            ("grpc.max_receive_message_length", self.limits.max_message_bytes),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ]


class SidecarServer:
    """A grpc.aio server with the sidecar and health services, and what they serve from."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        custodian: core.Custodian,
        hub: health.HealthHub,
        *,
        socket_path: pathlib.Path | None,
        front: peercred.UnixFront | None = None,
    ) -> None:
        self.grpc = grpc_server
        self.front = front
        self.custodian = custodian
        self.hub = hub
        self.health = grpc_health.aio.HealthServicer()
        self.socket_path = socket_path
        health_pb2_grpc.add_HealthServicer_to_server(self.health, grpc_server)
        self.servicer: service.Servicer | None = None  # set by create_server

    async def start(self) -> None:
        self.hub.start()
        await self.grpc.start()
        if self.front is not None:
            await self.front.start()
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, stop accepting calls, wait `grace` for calls in flight, free what the config says."""
        await self.health.enter_graceful_shutdown()
        await self.hub.stop()
        if self.front is not None:
            self.front.stop_accepting()
        await self.grpc.stop(grace)
        if self.front is not None:
            await self.front.stop()
        if self.servicer is not None:
            self.servicer.receiver.close()  # moves to this node that never finished
        await asyncio.to_thread(self.custodian.close)
        if self.socket_path is not None:
            self.socket_path.unlink(missing_ok=True)


def _socket_path(address: str) -> pathlib.Path | None:
    if address.startswith("unix://"):
        return pathlib.Path(address[len("unix://") :])
    if address.startswith("unix:"):
        return pathlib.Path(address[len("unix:") :])
    return None


def _prepare_socket(path: pathlib.Path) -> None:
    """Create the socket directory (0750) and remove a stale socket left by a crashed sidecar.
    Raises RuntimeError if another sidecar is listening there."""
    if not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o750)
    if path.exists():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise RuntimeError(f"another process is serving on {path}")
        finally:
            probe.close()


def create_server(
    address: str,
    *,
    config: config.Config,
    tls: Tls | None = None,
    metrics_: metrics.Metrics | None = None,
    also_listen: str | None = None,
    security: Security | None = None,
) -> tuple[SidecarServer, int]:
    """Build (not start) a sidecar on `address` (unix:///abs/path.sock or host:port, port 0 = any), and
    also on the TCP address `also_listen` when given: on a node, rank pods dial the socket while the
    operator dials TCP, so one process serves both. `tls` applies to TCP addresses only; a socket's
    protection is its directory's permissions. `security` bounds and authorizes calls (default: limits
    at their defaults, TCP callers without a client certificate trusted as the operator — the CLI
    refuses that unless --insecure).

    Returns (server, bound TCP port; 0 when only a Unix socket is served). Restores state from
    config.state_dir. Raises RuntimeError when an address cannot be bound."""
    path = _socket_path(address)
    if path is not None:
        if not path.is_absolute():
            raise RuntimeError(f"unix socket path must be absolute: {path}")
        _prepare_socket(path)  # before the custodian: the state dir may be this directory (0750)
    custodian = core.Custodian(config, metrics_=metrics_)
    restore.restore(custodian)
    source: health.GpuHealthSource
    if config.fake_gpu_dir is not None:
        from ghostserve.sidecar import fakegpu

        try:
            source = fakegpu.FakeGpuDirSource(config.fake_gpu_dir)
        except errors.SidecarError:
            custodian.close()
            raise
    elif config.fake_gpus is not None:
        source = health.FakeHealthSource(config.fake_gpus)
    else:
        try:
            source = health.NvmlHealthSource()
        except Exception as exc:  # no driver / no GPU: nothing to watch
            log.info("nvml-unavailable", extra={"error": str(exc)})
            source = health.FakeHealthSource(0)
    hub = health.HealthHub(
        source, on_event=lambda e: custodian.metrics.health_events.labels(e.kind.name).inc()
    )
    sec = security or Security(
        authz.Policy(own_uid=os.geteuid(), trust_anonymous_tcp=tls is None or tls.ca is None)
    )
    server = grpc.aio.server(options=sec.options(), maximum_concurrent_rpcs=sec.max_concurrent_rpcs)
    servicer = service.Servicer(custodian, hub, node=config.node)
    if tls is not None:
        servicer.mover.credentials = tls.peer_credentials()
    front = None
    if path is not None:
        front = peercred.UnixFront(path, peercred.private_dir(path))
        address = front.inner_address
    unix_dir = front.dir if front else None
    rpc.register(server, servicer, policy=sec.policy, limits=sec.limits, unix_dir=unix_dir)
    port = 0
    for where in (address, also_listen):
        if where is None:
            continue
        secure = tls is not None and _socket_path(where) is None
        try:
            bound = (
                server.add_secure_port(where, tls.credentials())
                if secure and tls
                else (server.add_insecure_port(where))
            )
        except RuntimeError as exc:
            custodian.close()
            raise RuntimeError(f"cannot bind {where}: {exc}") from exc
        if _socket_path(where) is None:
            port = bound
    srv = SidecarServer(server, custodian, hub, socket_path=path, front=front)
    srv.servicer = servicer
    return srv, port


async def serve(
    address: str,
    *,
    cfg: config.Config,
    tls: Tls | None = None,
    metrics_port: int | None = None,
    grace: float = 5.0,
    also_listen: str | None = None,
    security: Security | None = None,
) -> int:
    """Run a sidecar until SIGTERM or SIGINT; returns the exit status."""
    m = metrics.Metrics()
    server, port = create_server(
        address, config=cfg, tls=tls, metrics_=m, also_listen=also_listen, security=security
    )
    if metrics_port is not None:
        prom.start_http_server(metrics_port, registry=m.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info("serving", extra={"address": address, "port": port})
    try:
        await stop.wait()
    finally:
        log.info("shutting-down")
        await server.stop(grace)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    return flags.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    logs.setup(args.log_level)
    socket_path = args.socket if args.socket or args.listen else DEFAULT_SOCKET
    state_dir = args.state_dir
    if state_dir is None and socket_path:
        state_dir = pathlib.Path(socket_path).resolve().parent
    try:
        flags.check_transport(args)
        budget = config.parse_bytes(args.budget)
        cfg = flags.config_from(args, state_dir=state_dir, budget=budget)
        limits = rpc.Limits(
            max_message_bytes=config.parse_bytes(args.max_message_bytes),
            max_inflight_bytes=config.parse_bytes(args.max_inflight_bytes),
        )
    except ValueError as exc:
        print(f"ghostserve sidecar: {exc}", file=sys.stderr)
        return 2
    if args.insecure and args.listen:
        log.warning(
            "insecure-tcp",
            extra={"listen": args.listen, "note": "every TCP caller is trusted as the operator"},
        )
    address = f"unix://{pathlib.Path(socket_path).resolve()}" if socket_path else args.listen
    also_listen = args.listen if socket_path else None
    tls = Tls(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    security = Security(flags.policy_from(args), limits, max_concurrent_rpcs=args.max_concurrent_rpcs)
    try:
        return asyncio.run(
            serve(
                address,
                cfg=cfg,
                tls=tls,
                metrics_port=args.metrics_port,
                grace=args.grace,
                also_listen=also_listen,
                security=security,
            )
        )
    except errors.SidecarError as exc:
        print(f"ghostserve sidecar: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        log.error("failed", extra={"error": str(exc)})
        return 1
