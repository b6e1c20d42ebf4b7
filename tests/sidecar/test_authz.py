"""Authorization on the Unix socket: a group belongs to the uid that created it (SO_PEERCRED); other
uids cannot touch it, and operator-only calls refuse them (issue 13: any client could read or wreck any
group). Fails before the fix: every call below succeeded."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import grpc
import inproc
import kv
import pytest
from ghostserve.sidecar import authz, client, config

NOBODY = 65534
HERE = pathlib.Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")


@pytest.fixture
def served(short_tmp: pathlib.Path, shm_prefix: str) -> Iterator[tuple[str, client.SidecarClient]]:
    cfg = config.Config(budget_bytes=1 << 20, fake_gpus=1, shm_prefix=shm_prefix)
    address = inproc.unix_address(short_tmp)
    bg = inproc.Background(address, cfg)
    # Test-only: let another uid reach the socket (a chart gives rank pods the socket's group instead).
    short_tmp.chmod(0o755)
    (short_tmp / "sidecar.sock").chmod(0o666)
    c = client.SidecarClient(address, timeout=10)
    try:
        yield address, c
    finally:
        c.close()
        bg.stop()


def test_other_uids_cannot_touch_a_group_and_operator_calls_refuse_them(
    served: tuple[str, client.SidecarClient],
) -> None:
    address, root = served
    prot = kv.protection("xor", 1)
    root.attach(group="root-g", rank=0, world_size=2, layout=kv.LAYOUT, protection=prot)
    out = subprocess.run(
        [sys.executable, str(HERE / "as_user.py"), str(NOBODY), address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=HERE,
        env={**os.environ, "PYTHONPATH": str(HERE)},
    )
    assert out.returncode == 0, out.stderr
    got = {name: (code, extra) for name, code, extra in json.loads(out.stdout)}
    denied = "PERMISSION_DENIED"
    for name in ("attach-foreign", "commit-foreign", "describe-foreign", "release-foreign"):
        assert got[name][0] == denied, name
    assert got["attach-own-0"][0] == got["attach-own-1"][0] == got["describe-own"][0] == "OK"
    assert got["list"] == ("OK", ["nb-g"])  # the caller's groups only
    for name in ("mark-lost", "rebuild-healthy", "delete", "inject"):
        assert got[name][0] == denied, name
    # The sidecar's own uid (here root) is the operator: it sees and manages both groups.
    assert sorted(root.list_groups().groups) == ["nb-g", "root-g"]
    assert root.describe_group(group="root-g").ranks[0].attached
    assert not root.describe_group(group="root-g").ranks[1].attached
    root.mark_lost(group="nb-g", ranks=[0], reason="test")
    root.delete_group(group="nb-g")
    root.delete_group(group="root-g")


def test_policy_rules() -> None:
    """The rule table covers every RPC of the proto, and the pure checks decide as documented."""
    from ghostserve.v1 import sidecar_pb2 as pb

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Sidecar"].methods}
    assert methods <= set(authz.RULES), methods - set(authz.RULES)
    policy = authz.Policy(own_uid=1000, operator_names=frozenset({"op"}), peer_names=frozenset({"sc"}))
    assert policy.unix(1000).operator and policy.unix(0).operator and not policy.unix(1001).operator
    assert not policy.unix(None).allowed
    assert not policy.tcp(None).allowed and not policy.tcp(["stranger"]).allowed
    assert policy.tcp(["op"]).operator and policy.tcp(["x", "sc"]).peer
    user = policy.unix(1001)
    authz.check(authz.Rule.GROUP, user, creator="uid:1001", healthy=True, method="CommitChunk")
    authz.check(authz.Rule.REBUILD, user, creator="uid:1001", healthy=False, method="Rebuild")
    authz.check(authz.Rule.GROUP, user, creator="", healthy=True, method="Attach")  # unclaimed
    for rule, creator, healthy in (
        (authz.Rule.GROUP, "uid:7", True),
        (authz.Rule.REBUILD, "uid:1001", True),
        (authz.Rule.OPERATOR, "uid:1001", True),
        (authz.Rule.PEER, None, True),
    ):
        with pytest.raises(Exception, match=r"operator|own|may not") as err:
            authz.check(rule, user, creator=creator, healthy=healthy, method="X")
        assert getattr(err.value, "code", "") == "PERMISSION_DENIED"
    sidecar = policy.tcp(["sc"])
    authz.check(authz.Rule.PEER, sidecar, creator=None, healthy=True, method="StreamRebuild")
    with pytest.raises(Exception, match="operator"):
        authz.check(authz.Rule.OPERATOR, sidecar, creator=None, healthy=True, method="MarkLost")
    assert grpc.StatusCode.PERMISSION_DENIED.name == "PERMISSION_DENIED"
