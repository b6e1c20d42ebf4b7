"""`ghostserve sidecar` command-line flags and what they become (pure: parsing and checks only).

Transport security is refused rather than assumed: TCP without TLS needs `--insecure`, TLS without a
client CA needs `--tls-no-client-auth`; both mean "any TCP caller is trusted as the operator".
"""

from __future__ import annotations

import argparse
import os
import pathlib
import socket
from collections.abc import Sequence

from ghostserve.sidecar import authz, config

DEFAULT_SOCKET = "/run/ghostserve/sidecar.sock"


class FlagError(ValueError):
    """Flags that do not make a safe sidecar (exit status 2)."""


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
    p.add_argument(
        "--tls-no-client-auth",
        action="store_true",
        help="TLS without client certificates: every TCP caller is trusted as the operator",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext TCP: every TCP caller is trusted as the operator (loopback/tests only)",
    )
    p.add_argument(
        "--operator-identity",
        action="append",
        metavar="NAME",
        help="certificate name (or uid:N on the socket) of the operator; repeatable "
        "(default ghostserve-operator)",
    )
    p.add_argument(
        "--peer-identity",
        action="append",
        metavar="NAME",
        help="certificate name of other sidecars (StreamRebuild, ReceiveGroup); repeatable "
        "(default ghostserve-sidecar)",
    )
    p.add_argument(
        "--tls-allow-client",
        action="append",
        default=[],
        metavar="NAME",
        help="other certificate names allowed to call (their own groups only); repeatable",
    )
    p.add_argument("--budget", default="1GiB", help="memory budget for parity and the ledger (e.g. 64GiB)")
    p.add_argument("--max-pool-bytes", help="cap on the KV pools of all groups together (default: none)")
    p.add_argument("--max-group-pool-bytes", help="cap on one group's KV pools (default: none)")
    p.add_argument("--shm-headroom", default="64MiB", help="what /dev/shm must keep free after a new pool")
    p.add_argument("--max-message-bytes", default="4MiB", help="largest request message accepted")
    p.add_argument("--max-inflight-bytes", default="512MiB", help="decoded requests of all calls at once")
    p.add_argument("--max-concurrent-rpcs", type=int, default=64, help="calls served at once (others wait)")
    p.add_argument("--max-rebuild-streams", type=int, default=4, help="StreamRebuild calls served at once")
    p.add_argument(
        "--journal-compact", type=int, default=4096, help="stale journal lines that trigger a compaction"
    )
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


def _bytes(text: str | None) -> int | None:
    return None if text is None else config.parse_bytes(text)


def check_transport(args: argparse.Namespace) -> None:
    """Raise FlagError for TLS flags that do not go together or a TCP port left open by default."""
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_ca and not args.tls_cert):
        raise FlagError("--tls-cert and --tls-key go together (--tls-ca needs both)")
    if args.listen and not args.tls_cert and not args.insecure:
        raise FlagError(
            "--listen without --tls-cert/--tls-key would serve plaintext TCP to anyone who can reach "
            "it; give TLS flags, or --insecure (loopback/tests only)"
        )
    if args.tls_cert and not args.tls_ca and not args.tls_no_client_auth:
        raise FlagError(
            "TLS without --tls-ca accepts any client; give --tls-ca (mutual TLS), or "
            "--tls-no-client-auth to trust every TCP caller as the operator"
        )


def policy_from(args: argparse.Namespace) -> authz.Policy:
    return authz.Policy(
        own_uid=os.geteuid(),
        operator_names=frozenset(args.operator_identity or ["ghostserve-operator"]),
        peer_names=frozenset(args.peer_identity or ["ghostserve-sidecar"]),
        allowed_clients=frozenset(args.tls_allow_client),
        trust_anonymous_tcp=bool(args.insecure or args.tls_no_client_auth),
    )


def config_from(args: argparse.Namespace, *, state_dir: pathlib.Path | None, budget: int) -> config.Config:
    """Raises ValueError for byte sizes that do not parse or limits below 1."""
    if args.max_rebuild_streams < 1 or args.max_concurrent_rpcs < 1 or args.journal_compact < 1:
        raise ValueError("--max-rebuild-streams, --max-concurrent-rpcs and --journal-compact must be >= 1")
    headroom = _bytes(args.shm_headroom)
    return config.Config(
        budget_bytes=budget,
        state_dir=state_dir,
        spill_dir=args.spill_dir,
        keep_pools=args.keep_pools,
        encode_workers=args.encode_workers,
        queue_depth=args.queue_depth,
        node=args.node,
        fake_gpus=args.fake_nvml,
        fake_gpu_dir=args.fake_gpu_dir,
        max_pool_bytes=_bytes(args.max_pool_bytes),
        max_group_pool_bytes=_bytes(args.max_group_pool_bytes),
        shm_headroom_bytes=headroom or 0,
        shm_prefix=args.shm_prefix,
        max_rebuild_streams=args.max_rebuild_streams,
        journal_compact_records=args.journal_compact,
    )
