"""Protection settings: one table of codes and parity counts for every component."""

from __future__ import annotations

import dataclasses

import pytest
from ghostserve.kernels import Codec, protection


def test_parity_counts() -> None:
    P = protection.Protection
    assert [P(c).parity_shards for c in protection.CODES] == [0, 0, 1, 2, protection.DEFAULT_RS_PARITY]
    assert P("rs", 5).m == 5 and P("xor", 1).m == 1
    # none and replicate keep no parity shards whatever count a spec carries (replicate keeps N copies).
    assert P("replicate", 3).parity_shards == 0 and P("replicate").stored_shards(4) == 4
    assert P("none", 1).stored_shards(4) == 0 and P("rdp").stored_shards(4) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("raid6",), "unknown code 'raid6'"),
        (("xor", 2), "xor has exactly 1 parity"),
        (("rdp", 1), "rdp has exactly 2 parity"),
        (("rs", 0), r"rs needs 1\.\.8"),
        (("rs", 9), r"rs needs 1\.\.8"),
        (("rs", True), "parity_shards must be an int"),
        (("xor", None, 0), "chunk_tokens must be an int > 0"),
    ],
)
def test_bad_settings_raise(args: tuple[object, ...], message: str) -> None:
    with pytest.raises(protection.ProtectionError, match=message):
        protection.Protection(*args)  # type: ignore[arg-type]


def test_tolerates() -> None:
    assert not protection.Protection("none").tolerates(1, 4)
    assert protection.Protection("replicate").tolerates(4, 4)
    rs3 = protection.Protection("rs", 3)
    assert rs3.tolerates(3, 8) and not rs3.tolerates(4, 8)


def test_codec_and_protection_agree_on_parity_counts() -> None:
    for code in protection.ERASURE_CODES:
        assert Codec(code, 4).n_parity == protection.Protection(code).parity_shards


def test_round_trips_through_its_persisted_form() -> None:
    p = protection.Protection("rs", 3, 64)
    assert protection.Protection(**dataclasses.asdict(p)) == p
