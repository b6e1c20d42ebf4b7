"""Repeated int64 fields become int64 arrays: one copy out of the message (never a view of it), the
length checked first, the same values from a proto field as from a plain sequence."""

from __future__ import annotations

import numpy as np
import pytest
from ghostserve.sidecar import convert, errors
from ghostserve.v1 import sidecar_pb2 as pb


@pytest.mark.parametrize(
    ("field", "values"),
    [
        ("slots", []),
        ("slots", [5, 3, 9]),
        ("slots", [0, 2**32 - 1]),  # uint32 on the wire: its whole range survives the widening
        ("token_ids", list(range(-300, 300))),
        ("token_ids", [-(2**63), 2**63 - 1]),
        ("token_ids", list(range(convert.FAST_COPY_VALUES + 5))),  # past the memcpy path: iterated
    ],
)
def test_a_proto_field_and_a_list_give_the_same_array(field: str, values: list[int]) -> None:
    msg = pb.ChunkCommit()
    getattr(msg, field).extend(values)
    from_field = convert.int_array(getattr(msg, field), what=field, limit=1 << 20)
    from_list = convert.int_array(values, what=field, limit=1 << 20)
    assert from_field.dtype == from_list.dtype == np.int64
    assert from_field.tolist() == from_list.tolist() == values


def test_the_array_owns_its_bytes() -> None:
    msg = pb.ChunkCommit(slots=[1, 2, 3])
    arr = convert.int_array(msg.slots, what="slots", limit=10)
    msg.slots[0] = 99
    msg.Clear()
    del msg
    assert arr.tolist() == [1, 2, 3] and arr.flags.owndata


def test_too_many_values_are_refused_before_any_conversion() -> None:
    msg = pb.ChunkCommit(slots=list(range(11)))
    with pytest.raises(errors.InvalidArgument, match="slots: 11 values, at most 10"):
        convert.int_array(msg.slots, what="slots", limit=10)
