"""Bad input gets a named error with the index and sizes in its message, and no output changes."""

from __future__ import annotations

import ghostserve.kernels as gk
import numpy as np
import pytest

SENTINEL = 0x5A


def bufs(count: int, size: int = 64, fill: int | None = None) -> list[np.ndarray]:
    rng = np.random.default_rng(count * 1000 + size)
    if fill is not None:
        return [np.full(size, fill, np.uint8) for _ in range(count)]
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(count)]


def untouched(outs: list[np.ndarray]) -> bool:
    return all(bool((o == SENTINEL).all()) for o in outs)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "message"),
    [
        (("lrc", 4), {}, gk.CodecError, "unknown code 'lrc'"),
        (("xor", 0), {}, gk.ShardCountError, "n_data must be an int >= 1"),
        (("xor", 4, 2), {}, gk.ShardCountError, "xor has exactly 1 parity"),
        (("rdp", 4, 3), {}, gk.ShardCountError, "rdp has exactly 2 parity"),
        (("rs", 4, 9), {}, gk.ShardCountError, "rs needs 1..8 parity shards, got 9"),
        (("rs", 4, 0), {}, gk.ShardCountError, "rs needs 1..8 parity shards, got 0"),
        (("rs", 250, 6), {}, gk.ShardCountError, "n_data \\+ n_parity <= 255, got 256"),
        (("xor", 4), {"backend": "fpga"}, gk.CodecError, "unknown backend 'fpga'"),
    ],
)
def test_constructor_rejects(
    args: tuple[object, ...], kwargs: dict[str, str], error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        gk.Codec(*args, **kwargs)  # type: ignore[arg-type]


def test_errors_are_value_errors() -> None:
    for cls in (gk.ShardCountError, gk.ShardSizeError, gk.TooFewShardsError, gk.ShardTypeError):
        assert issubclass(cls, gk.CodecError) and issubclass(cls, ValueError)


@pytest.mark.parametrize("code", ["xor", "rdp", "rs"])
def test_encode_rejects_bad_shards_and_leaves_parity_alone(code: str) -> None:
    codec = gk.Codec(code, 4)
    m = codec.n_parity
    data = bufs(4)
    parity = bufs(m, fill=SENTINEL)
    with pytest.raises(gk.ShardCountError, match="data_shards has 3 buffers, this codec needs 4"):
        codec.encode(data[:3], parity)
    with pytest.raises(gk.ShardCountError, match=f"parity_out has {m + 1} buffers, this codec needs {m}"):
        codec.encode(data, [*parity, parity[0]])
    with pytest.raises(gk.ShardSizeError, match="shard 2 has 63 bytes but shard 0 has 64"):
        codec.encode([data[0], data[1], data[2][:63], data[3]], parity)
    with pytest.raises(gk.ShardSizeError, match=f"shard {4 + m - 1} has 65 bytes but shard 0 has 64"):
        codec.encode(data, [*parity[:-1], np.full(65, SENTINEL, np.uint8)])
    with pytest.raises(gk.ShardTypeError, match="data shard 1 must be C-contiguous"):
        codec.encode([data[0], np.repeat(data[1], 2)[::2], data[2], data[3]], parity)
    readonly = np.full(64, SENTINEL, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(gk.ShardTypeError, match=f"parity shard {4 + m - 1} is read-only"):
        codec.encode(data, [*parity[:-1], readonly])
    with pytest.raises(gk.ShardTypeError, match="data shard 3 has unsupported type list"):
        codec.encode([*data[:3], [1, 2, 3]], parity)
    with pytest.raises(gk.ShardCountError, match="must be a list"):
        codec.encode(b"abcd", parity)
    assert untouched(parity)


def test_reconstruct_rejects_bad_requests_and_leaves_out_alone() -> None:
    codec = gk.Codec("rs", 4, 2)
    data = bufs(4)
    parity = [np.empty(64, np.uint8) for _ in range(2)]
    codec.encode(data, parity)
    full = [*data, *parity]
    out = {0: np.full(64, SENTINEL, np.uint8), 1: np.full(64, SENTINEL, np.uint8)}
    with pytest.raises(gk.TooFewShardsError, match=r"3 shards are lost \(\[0, 1, 2\]\); rs with M=2"):
        codec.reconstruct([None, None, None, *full[3:]], out=out)
    with pytest.raises(gk.ShardCountError, match="shards has 5 buffers, this codec needs 6"):
        codec.reconstruct([None, *full[1:5]], out=out)
    with pytest.raises(gk.CodecError, match="out\\[1\\] given but shard 1 is present"):
        codec.reconstruct([None, *full[1:]], out=out)
    with pytest.raises(gk.CodecError, match="out index 7 is not a shard index"):
        codec.reconstruct([None, *full[1:]], out={0: out[0], 7: out[1]})
    with pytest.raises(gk.CodecError, match=r"shards \[0\] are lost: pass out="):
        codec.reconstruct([None, *full[1:]])
    with pytest.raises(gk.ShardSizeError, match="shard 0 has 32 bytes but shard 1 has 64"):
        codec.reconstruct([None, *full[1:]], out={0: np.full(32, SENTINEL, np.uint8)})
    readonly = np.full(64, SENTINEL, np.uint8)
    readonly.flags.writeable = False
    with pytest.raises(gk.ShardTypeError, match="out\\[0\\] is read-only"):
        codec.reconstruct([None, *full[1:]], out={0: readonly})
    assert untouched(list(out.values()))


def test_verify_rejects_mismatched_sizes() -> None:
    codec = gk.Codec("xor", 2)
    with pytest.raises(gk.ShardSizeError, match="shard 2 has 10 bytes but shard 0 has 64"):
        codec.verify(bufs(2), [np.zeros(10, np.uint8)])


def test_encode_gather_rejects_bad_input_and_leaves_parity_alone() -> None:
    layout = gk.KVLayout(2, 1, 4, "float16", 1, 16)
    codec = gk.Codec("rs", 3, 2)
    pools = [np.zeros(layout.pool_nbytes, np.uint8) for _ in range(3)]
    size = layout.shard_nbytes(4)
    parity = [np.full(size, SENTINEL, np.uint8) for _ in range(2)]
    slots = [0, 5, 9, 15]
    with pytest.raises(gk.CodecError, match=r"slot 16 at position 1 is out of range \[0, 16\)"):
        codec.encode_gather(pools, layout, [0, 16, 2, 3], parity)
    with pytest.raises(gk.ShardSizeError, match="pool 1 has 8 bytes, layout needs 512"):
        codec.encode_gather([pools[0], pools[1][:8], pools[2]], layout, slots, parity)
    with pytest.raises(gk.ShardSizeError, match="parity shard 4 has 3 bytes, 4 slots need 128"):
        codec.encode_gather(pools, layout, slots, [parity[0], np.full(3, SENTINEL, np.uint8)])
    with pytest.raises(gk.ShardCountError, match="pools has 2 buffers"):
        codec.encode_gather(pools[:2], layout, slots, parity)
    with pytest.raises(gk.CodecError, match="layout must be a KVLayout"):
        codec.encode_gather(pools, {"layers": 2}, slots, parity)  # type: ignore[arg-type]
    assert untouched(parity)


def test_cpu_backend_refuses_device_memory_clearly() -> None:
    class FakeCupy:  # only its module name matters to the type check
        pass

    FakeCupy.__module__ = "cupy._core.core"
    codec = gk.Codec("xor", 1)
    parity = [np.full(8, SENTINEL, np.uint8)]
    with pytest.raises(
        gk.ShardTypeError, match="data shard 0 is a cupy array; the cpu backend needs host memory"
    ):
        codec.encode([FakeCupy()], parity)
    assert untouched(parity)


def test_missing_backend_library_is_a_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("cupy") is not None:
        pytest.skip("cupy is installed here")
    with pytest.raises(gk.BackendUnavailableError, match="backend 'cuda' needs cupy"):
        gk.Codec("rs", 4, 2, backend="cuda")
