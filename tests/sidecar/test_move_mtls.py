"""MoveGroup over mutual TLS: the source dials the target with its own sidecar certificate (a peer
identity); the operator's certificate may move, an engine's may neither move nor feed ReceiveGroup."""

from __future__ import annotations

import pathlib
import shutil

import grpc
import kv
import move_kit
import numpy as np
import pytest
from ghostserve.sidecar import client
from ghostserve.v1 import sidecar_pb2 as pb
from test_mtls import openssl

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

GROUP = "ns/tls-r0"
# Certificate CNs: both sidecars are peers, the operator is the operator, "engine" an allowed client.
NAMES = {"src": "ghostserve-sidecar", "dst": "ghostserve-sidecar", "op": "ghostserve-operator"}
NAMES["eng"] = "engine"


def make_pki(d: pathlib.Path) -> None:
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=ca",
            cwd=d)
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, cn in NAMES.items():
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", "san.ext", cwd=d)


def creds(d: pathlib.Path, who: str) -> grpc.ChannelCredentials:
    pem, key = str(d / f"{who}.pem"), str(d / f"{who}.key")
    return client.channel_credentials(ca=str(d / "ca.pem"), cert=pem, key=key)


def test_move_over_mutual_tls_and_who_may_call_it(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    make_pki(short_tmp)
    op = creds(short_tmp, "op")
    started = []
    try:
        for name in ("src", "dst"):
            tls = ["--tls-cert", str(short_tmp / f"{name}.pem"), "--tls-key", str(short_tmp / f"{name}.key")]
            tls += ["--tls-ca", str(short_tmp / "ca.pem"), "--tls-allow-client", "engine"]
            started.append(kv.start_sidecar(short_tmp, *tls, listen=f"127.0.0.1:{kv.free_port()}",
                                            prefix=shm_prefix, name=name, client_kw={"credentials": op}))
        src, dst = started
        with src.client(credentials=op, timeout=60) as s, dst.client(credentials=op, timeout=60) as d:
            filled = move_kit.fill_group(s, GROUP, requests=2)
            eng = creds(short_tmp, "eng")
            with client.SidecarClient(src.address, credentials=eng, timeout=30) as e:
                with pytest.raises(grpc.RpcError) as denied:
                    e.move_group(group=GROUP, target=dst.address)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with client.SidecarClient(dst.address, credentials=eng, timeout=30) as e:
                header = pb.MoveHeader(group=GROUP, uid="x", world_size=2, layout=move_kit.LAYOUT,
                                       protection=move_kit.PROTECTION, pool_checksums=[0, 0])
                with pytest.raises(grpc.RpcError) as denied:
                    e.receive_group(iter([pb.MovePiece(header=header)]))
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert d.get_stats().moves_in_progress == 0

            reply = s.move_group(group=GROUP, target=dst.address, target_server_name="localhost")
            assert reply.ranks_moved == 2 and reply.resumed_from_bytes == 0
            got = move_kit.read_pools(d, GROUP)
            assert all(np.array_equal(a, b) for a, b in zip(got, filled.pools, strict=True))
    finally:
        for sc in started:
            sc.terminate()
