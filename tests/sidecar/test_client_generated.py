"""The clients' rpc methods are generated from the .proto (scripts/gen_client.py): the committed file is
current, every rpc has a typed method on both clients, and a method takes a message or typed fields."""

from __future__ import annotations

import inspect
import subprocess
import sys

import kv
import pytest
from ghostserve.sidecar import client
from ghostserve.v1 import sidecar_pb2 as pb


def test_generated_client_is_current() -> None:
    proc = subprocess.run(
        [sys.executable, str(kv.REPO / "scripts" / "gen_client.py"), "--check"], cwd=kv.REPO, timeout=120
    )
    assert proc.returncode == 0, "client_rpcs.py is stale: run scripts/gen_protos.py"


def test_methods_carry_the_request_fields_as_typed_keywords() -> None:
    sig = inspect.signature(client.SidecarClient.attach)
    fields = [f.name for f in pb.AttachRequest.DESCRIPTOR.fields]
    assert [n for n in sig.parameters if n in fields] == fields
    assert sig.parameters["layout"].annotation == "pb.KVLayout | None"
    commit = inspect.signature(client.AsyncSidecarClient.commit_chunk)
    assert commit.parameters["slots"].annotation == "Iterable[int] | None"
    assert inspect.iscoroutinefunction(client.AsyncSidecarClient.attach)
    assert not inspect.iscoroutinefunction(client.AsyncSidecarClient.watch_health)  # an async iterator


def test_a_message_and_fields_together_are_refused() -> None:
    c = client.SidecarClient("unix:///nonexistent/sock", timeout=0.1)
    try:
        with pytest.raises(TypeError, match="either a request message or its fields"):
            c.describe_group(pb.DescribeGroupRequest(group="a"), group="b")
    finally:
        c.close()


def test_every_rpc_is_wrapped_by_both_clients_with_its_request_fields() -> None:
    """The servicer side is checked by test_contract_complete; this is the client side, per rpc."""
    service = pb.DESCRIPTOR.services_by_name["Sidecar"]
    for m in service.methods:
        name = "".join("_" + ch.lower() if ch.isupper() else ch for ch in m.name).lstrip("_")
        sync, aio = getattr(client.SidecarClient, name), getattr(client.AsyncSidecarClient, name)
        assert inspect.iscoroutinefunction(aio) == (not m.server_streaming), m.name
        assert not inspect.iscoroutinefunction(sync), m.name
        if m.client_streaming or m.name == "Flush":
            continue
        for fn in (sync, aio):
            params = inspect.signature(fn).parameters
            assert [f.name for f in m.input_type.fields if f.name not in params] == [], m.name
