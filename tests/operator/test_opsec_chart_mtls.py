"""The chart's default mTLS, end to end with real processes: certificates made (openssl CLI) exactly as
the rendered cert-manager Certificates describe them, real `ghostserve sidecar` processes started with
the TLS flags and identities the rendered DaemonSet passes, and the operator's own sidecar client built
from the rendered operator flags (main.config_from -> sidecars.GrpcSidecars, as handlers builds it).

Shown: the operator's certificate may call MarkLost and move a group between two sidecars (the source
dials the target with its server certificate, a peer identity, and the name the operator checks);
another certificate of the same CA is refused (PERMISSION_DENIED), as is a sidecar's certificate for
operator-only calls; a client without a certificate is refused at the handshake, a plaintext client
fails, and so does the operator's client without the chart's --tls-server-name."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from ghostserve.operator import main as operator_main
from ghostserve.operator import sidecars
from ghostserve.sidecar import client, pools
from ghostserve.v1 import sidecar_pb2 as pb

from tests.charts import chart_support
from tests.operator import harness

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

REPO = pathlib.Path(__file__).resolve().parents[2]
MOUNT = "/etc/ghostserve/tls"  # where the chart mounts the TLS Secrets (ghostserve.tlsMount)
GROUP = "llm/chart-mtls-r0"
LAYOUT = pb.KVLayout(layers=2, kv_heads=2, head_dim=16, dtype=pb.FLOAT16, page_size=16, pool_slots=256)
PROTECTION = pb.Protection(code=pb.XOR, parity_shards=1, chunk_tokens=16)
ROGUE = "ghostserve-engine"  # a name the chart's sidecars were not told about
EKU = {"server auth": "serverAuth", "client auth": "clientAuth"}


def _render() -> list[dict[str, Any]]:
    pytest.importorskip("helm_python")
    return chart_support.objects(chart_support.load_render_script().render())


def _args(objs: list[dict[str, Any]], kind: str) -> list[str]:
    [workload] = [o for o in objs if o["kind"] == kind]
    args: list[str] = workload["spec"]["template"]["spec"]["containers"][0]["args"]
    return args


def _openssl(*args: str, cwd: pathlib.Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _issue(d: pathlib.Path, secret: str, names: list[str], usages: list[str]) -> None:
    """A Secret's files (tls.crt, tls.key, ca.crt) as cert-manager would write them for a Certificate
    with these dnsNames (the first also the CN) and usages, signed by the CA in d."""
    out = d / secret
    out.mkdir()
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", *ec, "-keyout", "tls.key", "-out", "req.csr", "-subj", f"/CN={names[0]}", cwd=out)
    ext = out / "ext.cnf"
    ext.write_text(
        "subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n"
        "extendedKeyUsage=" + ",".join(EKU[u] for u in usages if u in EKU) + "\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    _openssl("x509", "-req", "-in", "req.csr", "-CA", "../ca.crt", "-CAkey", "../ca.key", "-CAcreateserial",
             "-out", "tls.crt", "-days", "2", "-extfile", "ext.cnf", cwd=out)  # fmt: skip
    shutil.copy(d / "ca.crt", out / "ca.crt")


def _make_pki(d: pathlib.Path, objs: list[dict[str, Any]]) -> dict[str, str]:
    """The CA and every leaf Certificate of the render; returns Secret name -> first dnsName."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_ext = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=test-ca",
             *ca_ext, cwd=d)  # fmt: skip
    leaves = {}
    for cert in (o["spec"] for o in objs if o["kind"] == "Certificate" and not o["spec"].get("isCA")):
        _issue(d, cert["secretName"], cert["dnsNames"], cert["usages"])
        leaves[cert["secretName"]] = cert["dnsNames"][0]
    _issue(d, "rogue", [ROGUE], ["client auth"])  # same CA, another name
    return leaves


def _local(arg: str, secret_dir: pathlib.Path) -> str:
    return arg.replace(MOUNT, str(secret_dir))


class ChartSidecar:
    """`ghostserve sidecar` with the rendered DaemonSet's TLS and identity flags (its Secret at
    secret_dir); only the host-specific flags (socket, address, budget, node) are replaced."""

    def __init__(self, rendered: list[str], secret_dir: pathlib.Path, work: pathlib.Path, name: str) -> None:
        self.port = harness.free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.socket = work / name / "sidecar.sock"
        self.socket.parent.mkdir(mode=0o700)
        self.prefix = f"gs-cm{secrets.token_hex(3)}-"
        host_specific = ("--socket=", "--listen=", "--budget=", "--metrics-port=", "--node=", "--keep-pools")
        kept = [_local(a, secret_dir) for a in rendered[1:] if not a.startswith(host_specific)]
        assert any(a.startswith("--tls-ca=") for a in kept) and "--insecure" not in kept
        host = [f"--socket={self.socket}", f"--listen={self.address}", "--budget=64MiB", f"--node={name}"]
        self.args = [*kept, *host, f"--shm-prefix={self.prefix}", "--fake-nvml=2", "--grace=2"]
        self.log = work / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ghostserve.cli.main", "sidecar", *self.args],
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "GHOSTSERVE_LOG_LEVEL": "WARNING"},
            )
        with self.local(timeout=10) as c:
            try:
                c.wait_ready(timeout=60)
            except grpc.FutureTimeoutError:
                raise AssertionError(f"sidecar {name} never served: {self.log.read_text()[-3000:]}") from None

    def local(self, timeout: float = 10) -> client.SidecarClient:
        """The Unix socket: the sidecar's own uid is operator-equivalent there."""
        return client.SidecarClient(f"unix://{self.socket}", timeout=timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for seg in pathlib.Path("/dev/shm").glob(self.prefix + "*"):
            seg.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def chart() -> Iterator[tuple[list[dict[str, Any]], pathlib.Path, dict[str, str]]]:
    objs = _render()
    # Short path: Unix socket paths are limited to 107 bytes.
    with tempfile.TemporaryDirectory(prefix="gs-mtls-") as tmp:
        d = pathlib.Path(tmp)
        yield objs, d, _make_pki(d, objs)


def _secret_of(objs: list[dict[str, Any]], kind: str) -> str:
    [workload] = [o for o in objs if o["kind"] == kind]
    [volume] = [v for v in workload["spec"]["template"]["spec"]["volumes"] if v["name"] == "tls"]
    secret: str = volume["secret"]["secretName"]
    return secret


@contextlib.contextmanager
def _sidecars(chart: Any, *names: str) -> Iterator[list[ChartSidecar]]:
    objs, d, _ = chart
    secret_dir = d / _secret_of(objs, "DaemonSet")
    started: list[ChartSidecar] = []
    try:
        for name in names:
            started.append(ChartSidecar(_args(objs, "DaemonSet"), secret_dir, d, name))
        yield started
    finally:
        for sc in started:
            sc.stop()


def _operator_port(chart: Any, **override: Any) -> sidecars.GrpcSidecars:
    """The operator's sidecar client exactly as `ghostserve operator` builds it from the rendered args."""
    objs, d, _ = chart
    secret_dir = d / _secret_of(objs, "Deployment")
    args = operator_main.parse_args([_local(a, secret_dir) for a in _args(objs, "Deployment")[1:]])
    for key, value in override.items():
        setattr(args, key, value)
    config = operator_main.config_from(args)
    assert config.tls is not None
    return sidecars.GrpcSidecars(timeout=10.0, tls=config.tls)


def _attach(c: client.SidecarClient, group: str, seed: int) -> list[np.ndarray]:
    """Attach two ranks as an engine would and fill their pools; returns copies of what was written."""
    rng = np.random.default_rng(seed)
    written = []
    for rank in range(2):
        reply = c.attach(group=group, rank=rank, world_size=2, layout=LAYOUT, protection=PROTECTION,
                         worker_id=f"engine-{rank}")  # fmt: skip
        mm, pool = pools.map_pool(reply.pool)
        pool[:] = rng.integers(0, 256, pool.size, dtype=np.uint8)
        written.append(pool.copy())
        del pool
        mm.close()
    return written


def _credentials(chart: Any, secret: str, *, cert: bool = True) -> grpc.ChannelCredentials:
    _, d, _ = chart
    files = d / secret
    if not cert:
        return client.channel_credentials(ca=str(files / "ca.crt"))
    return client.channel_credentials(
        ca=str(files / "ca.crt"), cert=str(files / "tls.crt"), key=str(files / "tls.key")
    )


def _code(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    code: grpc.StatusCode = err.value.code()
    return code


def test_operator_certificate_may_mark_lost_others_may_not(chart: Any) -> None:
    objs, _, leaves = chart
    sidecar_secret = _secret_of(objs, "DaemonSet")
    server_name = leaves[sidecar_secret]
    with _sidecars(chart, "n0") as [sc]:
        with sc.local() as local:
            _attach(local, GROUP, seed=1)

        async def operator_calls() -> tuple[bool, bool]:
            port = _operator_port(chart)
            try:
                lost = await port.mark_lost(sc.address, GROUP, [1], "chart mTLS test")
                missing = await port.mark_lost(sc.address, "llm/none-r0", [0], "chart mTLS test")
                return lost, missing
            finally:
                await port.close()

        assert asyncio.run(operator_calls()) == (True, False)
        with sc.local() as local:
            ranks = {r.rank: r for r in local.describe_group(group=GROUP).ranks}
            assert not ranks[1].pool_valid and ranks[0].pool_valid

        def dial(creds: grpc.ChannelCredentials | None) -> client.SidecarClient:
            return client.SidecarClient(sc.address, credentials=creds, server_name=server_name, timeout=10)

        # Same CA, another name: every call is refused, MarkLost included.
        with dial(_credentials(chart, "rogue")) as rogue:
            assert (
                _code(lambda: rogue.mark_lost(group=GROUP, ranks=[0], reason="x"))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            assert _code(lambda: rogue.list_groups()) == grpc.StatusCode.PERMISSION_DENIED
        # A sidecar's certificate is a peer: not the operator.
        with dial(_credentials(chart, sidecar_secret)) as peer:
            assert (
                _code(lambda: peer.mark_lost(group=GROUP, ranks=[0], reason="x"))
                == grpc.StatusCode.PERMISSION_DENIED
            )
            assert _code(lambda: peer.delete_group(group=GROUP)) == grpc.StatusCode.PERMISSION_DENIED
        # No client certificate: the handshake fails; plaintext: no TLS, no connection.
        for creds in (_credentials(chart, sidecar_secret, cert=False), None):
            with dial(creds) as anonymous:
                assert (
                    _code(lambda: anonymous.mark_lost(group=GROUP, ranks=[0], reason="x"))
                    == grpc.StatusCode.UNAVAILABLE
                )
        with sc.local() as local:
            assert [r.pool_valid for r in local.describe_group(group=GROUP).ranks] == [True, False]

        # The operator needs the chart's --tls-server-name: the certificate names no node IP.
        async def without_server_name() -> None:
            port = _operator_port(chart, tls_server_name=None)
            try:
                await port.mark_lost(sc.address, GROUP, [0], "x")
            finally:
                await port.close()

        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(without_server_name())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert sc.proc.returncode == 0, sc.log.read_text()[-3000:]


def test_operator_moves_a_group_between_chart_sidecars(chart: Any) -> None:
    """MoveGroup over the chart's mTLS: the source presents the sidecar certificate to the target
    (a --peer-identity there) and checks the target's name, which the operator passes on."""
    with _sidecars(chart, "src", "dst") as [src, dst]:
        with src.local() as local:
            written = _attach(local, GROUP, seed=2)
            for rank in range(2):
                local.detach(group=GROUP, rank=rank)

        async def move() -> sidecars.MoveOutcome:
            port = _operator_port(chart)
            try:
                return await port.move_group(src.address, GROUP, dst.address)
            finally:
                await port.close()

        outcome = asyncio.run(move())
        assert outcome.ranks_moved == 2 and outcome.bytes_moved == sum(w.nbytes for w in written)
        with dst.local() as local:
            for rank in range(2):
                reply = local.attach(
                    group=GROUP, rank=rank, world_size=2, layout=LAYOUT, protection=PROTECTION,
                    worker_id=f"engine-{rank}",
                )  # fmt: skip
                assert not reply.needs_rebuild
                mm, pool = pools.map_pool(reply.pool)
                assert np.array_equal(pool, written[rank])
                del pool
                mm.close()
