"""Every rpc of the .proto is served: an rpc left to the generated base class would answer
UNIMPLEMENTED to engines and the operator."""

from __future__ import annotations

from ghostserve.sidecar import client, service
from ghostserve.v1 import sidecar_pb2, sidecar_pb2_grpc


def test_servicer_implements_every_rpc_and_the_client_wraps_it() -> None:
    rpcs = [m.name for m in sidecar_pb2.DESCRIPTOR.services_by_name["Sidecar"].methods]
    assert len(rpcs) >= 17
    unimplemented = [
        r for r in rpcs if getattr(service.Servicer, r) is getattr(sidecar_pb2_grpc.SidecarServicer, r)
    ]
    assert unimplemented == []
    snake = {"".join("_" + c.lower() if c.isupper() else c for c in r).lstrip("_") for r in rpcs}
    for cls in (client.SidecarClient, client.AsyncSidecarClient):
        assert sorted(n for n in snake if not hasattr(cls, n)) == [], cls.__name__
