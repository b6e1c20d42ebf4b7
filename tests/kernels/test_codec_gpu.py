"""GPU only (skipped without one): the cuda and torch-on-CUDA backends match the CPU oracle bit for bit,
with torch CUDA tensors of every dtype, up to M lost shards, the fused gather kernels (checked to have
run) and the unaligned fallbacks (checked to have been taken)."""

from __future__ import annotations

import itertools

import ghostserve.kernels as gk
import kv_testdata
import numpy as np
import pytest

pytestmark = pytest.mark.gpu


def loss_patterns(n: int, m: int, rng: np.random.Generator, *, limit: int = 24) -> list[tuple[int, ...]]:
    """Every pattern of 1..m lost shards where there are at most `limit` of a size, else `limit` random
    ones of that size (always including the first and the last m shards): up to the full M losses."""
    out: list[tuple[int, ...]] = []
    for k in range(1, m + 1):
        every = list(itertools.combinations(range(n + m), k))
        if len(every) <= limit:
            out += every
        else:
            picks = {tuple(range(k)), tuple(range(n + m - k, n + m))}
            while len(picks) < limit:
                picks.add(tuple(sorted(int(i) for i in rng.choice(n + m, k, replace=False))))
            out += sorted(picks)
    return out


def oracle(code: str, n: int, m: int, raw: list[np.ndarray]) -> list[np.ndarray]:
    parity = [np.empty(raw[0].size, np.uint8) for _ in range(m)]
    gk.Codec(code, n, m, backend="numpy").encode(raw, parity)
    return parity


@pytest.mark.parametrize("backend", ["cuda", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float8"])
@pytest.mark.parametrize(
    ("code", "n", "m"), [("xor", 8, 1), ("rdp", 4, 2), ("rdp", 7, 2), ("rs", 4, 2), ("rs", 10, 8)]
)
def test_cuda_tensors_bit_identical_to_cpu(backend: str, dtype: str, code: str, n: int, m: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(n * 7 + m)
    for nbytes in (4 * (1 << 20) + 12, 4096 * 3):  # a ragged tail, then whole vectors
        raw = [kv_testdata.shard_bytes(rng, dtype, nbytes) for _ in range(n)]
        data = [kv_testdata.typed(r, dtype, "torch").cuda() for r in raw]
        parity = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(m)]
        codec = gk.Codec(code, n, m, backend=backend)
        codec.encode(data, parity)
        want = oracle(code, n, m, raw)
        assert all(np.array_equal(p.cpu().numpy(), w) for p, w in zip(parity, want, strict=True))
        full = [*data, *parity]
        host = [*raw, *want]
        for lost in loss_patterns(n, m, rng):
            out = {i: torch.full((nbytes,), 0xA5, dtype=torch.uint8, device="cuda") for i in lost}
            codec.reconstruct([None if i in lost else s for i, s in enumerate(full)], out=out)
            for i in lost:
                assert np.array_equal(out[i].cpu().numpy(), host[i]), (code, lost, i)


@pytest.mark.parametrize("head_dim", [64, 5])  # 5 x fp16: rows are not whole 16-byte vectors (no fusion)
@pytest.mark.parametrize(("code", "m"), [("xor", 1), ("rs", 2), ("rs", 5), ("rdp", 2)])
def test_fused_gather_encode_matches_cpu(head_dim: int, code: str, m: int) -> None:
    cupy = pytest.importorskip("cupy")
    layout = gk.KVLayout(
        layers=4, kv_heads=2, head_dim=head_dim, dtype="float16", page_size=16, pool_slots=512
    )
    n = 4
    rng = np.random.default_rng(head_dim)
    pools = [rng.integers(0, 256, layout.pool_nbytes, dtype=np.uint8) for _ in range(n)]
    slots = rng.permutation(layout.pool_slots)[:256]
    shards = [np.empty(layout.shard_nbytes(256), np.uint8) for _ in range(n)]
    for pool, shard in zip(pools, shards, strict=True):
        gk.gather_shard(pool, layout, slots, shard)
    want = oracle(code, n, m, shards)
    parity = [cupy.zeros(shards[0].size, dtype=cupy.uint8) for _ in range(m)]
    codec = gk.Codec(code, n, m, backend="cuda")
    fused = codec._be.encode_gather_fused  # type: ignore[attr-defined]
    ran: list[bool] = []

    def spy(*args: object) -> bool:
        ran.append(bool(fused(*args)))
        return ran[-1]

    codec._be.encode_gather_fused = spy  # type: ignore[attr-defined]
    codec.encode_gather([cupy.asarray(p) for p in pools], layout, slots, parity)
    assert all(np.array_equal(p.get(), w) for p, w in zip(parity, want, strict=True))
    # xor and rs run the one fused kernel when rows are whole 16-byte vectors, else fall back to the
    # blocked path; rdp's diagonals never take the fused path.
    expected = [layout.row_bytes % 16 == 0] if code in ("xor", "rs") else []
    assert ran == expected, (code, head_dim, ran)


def test_cuda_backend_refuses_host_memory() -> None:
    codec = gk.Codec("xor", 1, backend="cuda")
    with pytest.raises(gk.ShardTypeError, match="host memory"):
        codec.encode([np.zeros(16, np.uint8)], [np.zeros(16, np.uint8)])
