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
from ghostserve.sidecar import client, config, core, errors, health, logs, metrics, restore, service
from ghostserve.v1 import sidecar_pb2_grpc as pb_grpc
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


DEFAULT_SOCKET = "/run/ghostserve/sidecar.sock"


class SidecarServer:
    """A grpc.aio server with the sidecar and health services, and what they serve from."""

    def __init__(
        self,
        grpc_server: grpc.aio.Server,
        custodian: core.Custodian,
        hub: health.HealthHub,
        *,
        socket_path: pathlib.Path | None,
    ) -> None:
        self.grpc = grpc_server
        self.custodian = custodian
        self.hub = hub
        self.health = grpc_health.aio.HealthServicer()
        self.socket_path = socket_path
        health_pb2_grpc.add_HealthServicer_to_server(self.health, grpc_server)
        self.servicer: service.Servicer | None = None  # set by create_server

    async def start(self) -> None:
        self.hub.start()
        await self.grpc.start()
        if self.socket_path is not None:
            os.chmod(self.socket_path, 0o660)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        """NOT_SERVING, stop accepting calls, wait `grace` for calls in flight, free what the config says."""
        await self.health.enter_graceful_shutdown()
        await self.hub.stop()
        await self.grpc.stop(grace)
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
) -> tuple[SidecarServer, int]:
    """Build (not start) a sidecar on `address` (unix:///abs/path.sock or host:port, port 0 = any), and
    also on the TCP address `also_listen` when given: on a node, rank pods dial the socket while the
    operator dials TCP, so one process serves both. `tls` applies to TCP addresses only; a socket's
    protection is its directory's permissions.

    Returns (server, bound TCP port; 0 when only a Unix socket is served). Restores state from
    config.state_dir. Raises RuntimeError when an address cannot be bound."""
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
            log.info('{"event": "nvml-unavailable", "error": %s}', _json_str(exc))
            source = health.FakeHealthSource(0)
    hub = health.HealthHub(
        source, on_event=lambda e: custodian.metrics.health_events.labels(e.kind.name).inc()
    )
    server = grpc.aio.server(options=client.CHANNEL_OPTIONS)
    servicer = service.Servicer(custodian, hub, node=config.node)
    if tls is not None:
        servicer.mover.credentials = tls.peer_credentials()
    pb_grpc.add_SidecarServicer_to_server(servicer, server)
    path = _socket_path(address)
    if path is not None:
        if not path.is_absolute():
            custodian.close()
            raise RuntimeError(f"unix socket path must be absolute: {path}")
        _prepare_socket(path)
        address = f"unix://{path}"
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
    srv = SidecarServer(server, custodian, hub, socket_path=path)
    srv.servicer = servicer
    return srv, port


def _json_str(exc: BaseException) -> str:
    import json

    return json.dumps(str(exc))


async def serve(
    address: str,
    *,
    cfg: config.Config,
    tls: Tls | None = None,
    metrics_port: int | None = None,
    grace: float = 5.0,
    also_listen: str | None = None,
) -> int:
    """Run a sidecar until SIGTERM or SIGINT; returns the exit status."""
    m = metrics.Metrics()
    server, port = create_server(address, config=cfg, tls=tls, metrics_=m, also_listen=also_listen)
    if metrics_port is not None:
        prom.start_http_server(metrics_port, registry=m.registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    log.info('{"event": "serving", "address": %s, "port": %d}', _json_str(Exception(address)), port)
    try:
        await stop.wait()
    finally:
        log.info('{"event": "shutting-down"}')
        await server.stop(grace)
    return 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve sidecar", description="node-local GhostServe sidecar (gRPC)")
    p.add_argument(
        "--socket",
        help=f"Unix socket path for rank pods (default {DEFAULT_SOCKET} unless only --listen is given)",
    )
    p.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="also (or, without --socket, only) listen on TCP, for the operator",
    )
    p.add_argument("--tls-cert", type=pathlib.Path, help="server certificate (PEM), TCP only")
    p.add_argument("--tls-key", type=pathlib.Path, help="server private key (PEM)")
    p.add_argument("--tls-ca", type=pathlib.Path, help="CA for client certificates: enables mutual TLS")
    p.add_argument("--budget", default="1GiB", help="parity host-memory budget (e.g. 64GiB)")
    p.add_argument(
        "--state-dir",
        type=pathlib.Path,
        help="state file for re-adopting pools after a restart (default: the socket's directory)",
    )
    p.add_argument(
        "--spill-dir", type=pathlib.Path, help="keep parity + ledger on disk so they survive restarts"
    )
    p.add_argument(
        "--keep-pools",
        action="store_true",
        help="on shutdown keep pools, state and spill for the next start instead of freeing them",
    )
    p.add_argument("--encode-workers", type=int, default=2)
    p.add_argument("--queue-depth", type=int, default=4096)
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    p.add_argument(
        "--fake-nvml", type=int, metavar="N", help="fake N GPUs (tests, demos): enables InjectFault"
    )
    p.add_argument(
        "--fake-gpu-dir",
        type=pathlib.Path,
        metavar="DIR",
        help="fake this node's GPUs from DIR/gpus.json (embedded cluster): enables InjectFault",
    )
    p.add_argument("--shm-prefix", default="gs-", help="prefix of pool segment names in /dev/shm (gs...)")
    p.add_argument("--node", default=os.environ.get("NODE_NAME", socket.gethostname()))
    p.add_argument("--grace", type=float, default=5.0, help="seconds calls in flight get at shutdown")
    p.add_argument("--log-level", default=None)
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args([] if argv is None else argv)
    logs.setup(args.log_level)
    try:
        budget = config.parse_bytes(args.budget)
    except ValueError as exc:
        print(f"ghostserve sidecar: {exc}", file=sys.stderr)
        return 2
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_ca and not args.tls_cert):
        print(
            "ghostserve sidecar: --tls-cert and --tls-key go together (--tls-ca needs both)",
            file=sys.stderr,
        )
        return 2
    socket_path = args.socket if args.socket or args.listen else DEFAULT_SOCKET
    address = f"unix://{pathlib.Path(socket_path).resolve()}" if socket_path else args.listen
    also_listen = args.listen if socket_path else None
    state_dir = args.state_dir
    if state_dir is None and socket_path:
        state_dir = pathlib.Path(socket_path).resolve().parent
    cfg = config.Config(
        budget_bytes=budget,
        state_dir=state_dir,
        spill_dir=args.spill_dir,
        keep_pools=args.keep_pools,
        encode_workers=args.encode_workers,
        queue_depth=args.queue_depth,
        node=args.node,
        fake_gpus=args.fake_nvml,
        fake_gpu_dir=args.fake_gpu_dir,
        shm_prefix=args.shm_prefix,
    )
    tls = Tls(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    try:
        return asyncio.run(
            serve(
                address,
                cfg=cfg,
                tls=tls,
                metrics_port=args.metrics_port,
                grace=args.grace,
                also_listen=also_listen,
            )
        )
    except errors.SidecarError as exc:
        print(f"ghostserve sidecar: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, OSError) as exc:
        log.error('{"event": "failed", "error": %s}', _json_str(exc))
        return 1
