"""TCP with mutual TLS: a client with a certificate from the CA gets in, others do not."""

from __future__ import annotations

import pathlib
import shutil
import subprocess

import grpc
import kv
import pytest
from ghostserve.sidecar import client

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


# A fresh unencrypted P-256 key for each certificate request.
NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


def make_pki(d: pathlib.Path) -> None:
    openssl(
        "req",
        "-x509",
        *NEW_EC_KEY,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=ghostserve-test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client", "intruder", "tenant"):
        openssl(
            "req",
            *NEW_EC_KEY,
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN={name}",
            cwd=d,
        )
        openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            cwd=d,
        )


def test_mutual_tls_on_tcp_beside_a_plain_unix_socket(short_tmp: pathlib.Path, shm_prefix: str) -> None:
    """One sidecar serves rank pods on its socket and the operator on mTLS TCP: both see one state."""
    make_pki(short_tmp)
    sock = short_tmp / "run" / "sidecar.sock"
    address = f"127.0.0.1:{kv.free_port()}"
    good = client.channel_credentials(
        ca=str(short_tmp / "ca.pem"), cert=str(short_tmp / "client.pem"), key=str(short_tmp / "client.key")
    )
    sc = kv.start_sidecar(
        short_tmp,
        "--tls-cert",
        str(short_tmp / "server.pem"),
        "--tls-key",
        str(short_tmp / "server.key"),
        "--tls-ca",
        str(short_tmp / "ca.pem"),
        "--operator-identity",
        "client",
        "--tls-allow-client",
        "tenant",
        "--socket",
        str(sock),
        listen=address,
        prefix=shm_prefix,
        client_kw={"credentials": good},
    )
    try:
        with client.SidecarClient(address, credentials=good) as c:
            assert c.list_groups().groups == []
        with client.SidecarClient(f"unix://{sock}", timeout=5) as local:
            assert local.health() == 1 and local.list_groups().groups == []
        no_cert = client.channel_credentials(ca=str(short_tmp / "ca.pem"))
        for creds in (no_cert, None):
            with (
                client.SidecarClient(address, credentials=creds, timeout=5) as c,
                pytest.raises(grpc.RpcError) as err,
            ):
                c.list_groups()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # Certificates of the same CA that name nobody the sidecar was told about (the server's own
        # included) get nothing (issue 13: before, any certificate of the CA got in).
        for name in ("intruder", "server"):
            creds = client.channel_credentials(
                ca=str(short_tmp / "ca.pem"),
                cert=str(short_tmp / f"{name}.pem"),
                key=str(short_tmp / f"{name}.key"),
            )
            with client.SidecarClient(address, credentials=creds, timeout=5) as c:
                with pytest.raises(grpc.RpcError) as err:
                    c.list_groups()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # An allowed client owns what it creates, and operator-only calls refuse it.
        tenant = client.channel_credentials(
            ca=str(short_tmp / "ca.pem"),
            cert=str(short_tmp / "tenant.pem"),
            key=str(short_tmp / "tenant.key"),
        )
        with client.SidecarClient(address, credentials=tenant, timeout=5) as t:
            prot = kv.protection("xor", 1)
            for r in range(2):
                t.attach(group="t", rank=r, world_size=2, layout=kv.LAYOUT, protection=prot)
            for call in (
                lambda: t.mark_lost(group="t", ranks=[0], reason="x"),
                lambda: t.delete_group(group="t"),
                lambda: t.rebuild(group="t", lost_ranks=[1]),
                lambda: list(t.stream_rebuild(group="t", lost_ranks=[1], rank=1)),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert t.list_groups().groups == ["t"]
        with client.SidecarClient(address, credentials=good) as op:
            assert op.describe_group(group="t").ranks[0].attached
            op.delete_group(group="t")
    finally:
        assert sc.terminate() == 0
