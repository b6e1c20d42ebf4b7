"""The wire layer converts every code and dtype the kernels know, both ways, and refuses what it cannot."""

from __future__ import annotations

import pytest
from ghostserve.kernels import layout as kvlayout
from ghostserve.kernels import protection
from ghostserve.v1 import sidecar_pb2 as pb
from ghostserve.wire import layout as wire_layout
from ghostserve.wire import protection as wire_protection


def test_every_code_and_dtype_has_one_proto_value() -> None:
    assert set(wire_protection.CODE_IDS) == set(protection.CODES)
    assert set(wire_layout.DTYPE_IDS) == set(kvlayout.ITEMSIZE)
    # Every proto enum value but the unset 0 maps back: a new proto value needs a kernels definition.
    assert set(wire_protection.CODES) == {v.number for v in pb.Code.DESCRIPTOR.values if v.number}
    assert set(wire_layout.DTYPES) == {v.number for v in pb.DType.DESCRIPTOR.values if v.number}


@pytest.mark.parametrize(("code", "m"), [("none", 0), ("replicate", 0), ("xor", 1), ("rdp", 2), ("rs", 5)])
def test_protection_round_trips(code: str, m: int) -> None:
    p = protection.Protection(code, m, 64)
    back = wire_protection.protection_from(wire_protection.protection_to(p))
    assert back == p and back.parity_shards == m


@pytest.mark.parametrize(("code", "m"), [(pb.XOR, 1), (pb.RDP, 2), (pb.RS, 2), (pb.REPLICATE, 0)])
def test_unset_parity_on_the_wire_is_the_codes_default(code: int, m: int) -> None:
    got = wire_protection.protection_from(pb.Protection(code=code, chunk_tokens=16))  # type: ignore[arg-type]
    assert got.parity_shards == m


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.Protection(chunk_tokens=16), r"protection\.code must be set"),
        (pb.Protection(code=pb.XOR, parity_shards=2, chunk_tokens=16), "xor has exactly 1"),
        (pb.Protection(code=pb.RS, parity_shards=9, chunk_tokens=16), r"rs needs 1\.\.8"),
        (pb.Protection(code=pb.RS, parity_shards=2), "chunk_tokens must be an int > 0"),
    ],
)
def test_bad_protection_is_a_value_error(msg: pb.Protection, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        wire_protection.protection_from(msg)


def test_layout_round_trips_and_refuses_an_unset_dtype() -> None:
    for dtype in kvlayout.ITEMSIZE:
        lay = kvlayout.KVLayout(3, 2, 64, dtype, 16, 1024)
        assert wire_layout.layout_from(wire_layout.layout_to(lay)) == lay
    with pytest.raises(ValueError, match=r"layout\.dtype must be set"):
        wire_layout.layout_from(pb.KVLayout(layers=1, kv_heads=1, head_dim=1, page_size=1, pool_slots=1))
    with pytest.raises(ValueError, match="positive int"):
        wire_layout.layout_from(pb.KVLayout(layers=0, kv_heads=1, head_dim=1, dtype=pb.FLOAT16, page_size=1,
                                            pool_slots=1))  # fmt: skip
