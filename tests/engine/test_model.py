"""The reference model in one process: batch invariance, deterministic replay, TP sharding rules."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from ghostserve.engine.reference import config, kvpool, model, schedule

CFG = config.ModelConfig()
T = 8


def _pool(slots: int = 256) -> tuple[np.ndarray, kvpool.PoolShape, torch.Tensor]:
    shape = kvpool.PoolShape.for_model(CFG, tp=1, pool_slots=slots, page_size=8)
    buf = np.zeros(shape.nbytes, dtype=np.uint8)
    return buf, shape, kvpool.as_tensor(buf, shape)


def _generate(
    w, pool, prompts: dict[str, list[int]], slot_base: dict[str, int], new: int
) -> dict[str, list[int]]:
    """Chunked prefill + batched greedy decode of several requests, the engine's schedule."""
    toks = {k: list(v) for k, v in prompts.items()}
    kv = dict.fromkeys(prompts, 0)
    while any(len(toks[k]) - len(prompts[k]) < new for k in prompts):
        live = [k for k in prompts if len(toks[k]) - len(prompts[k]) < new]
        pieces = []
        for k in live:
            a, b = schedule.next_piece(kv[k], len(prompts[k]), T)
            slots = torch.arange(slot_base[k], slot_base[k] + b)
            pieces.append(model.Piece(torch.tensor(toks[k][a:b]), a, slots))
        nxt = model.greedy(w, model.forward(w, pieces, pool, model.LocalCollective()))
        for k, p, tok in zip(live, pieces, nxt, strict=True):
            kv[k] = p.start + p.tokens.shape[0]
            if kv[k] == len(toks[k]):
                toks[k].append(tok)
    return toks


def test_batch_invariant_and_deterministic():
    w = model.build_weights(CFG, tp=1, rank=0)
    gen = torch.Generator().manual_seed(1)
    prompts = {k: torch.randint(0, CFG.vocab, (n,), generator=gen).tolist() for k, n in (("a", 21), ("b", 9))}
    base = {"a": 0, "b": 128}
    buf1, shape, pool1 = _pool()
    alone = _generate(w, pool1, {"a": prompts["a"]}, base, 12)
    buf2, _, pool2 = _pool()
    together = _generate(w, pool2, prompts, base, 12)
    assert together["a"] == alone["a"]
    slots = list(range(0, 21 + 11))
    assert kvpool.shard_bytes(buf1, shape, slots) == kvpool.shard_bytes(buf2, shape, slots)
    # Tokens are not all the same (the model is not degenerate).
    assert len(set(together["a"][21:])) > 1


@dataclasses.dataclass
class _Wiped:
    """One request generated into a fresh pool, its KV bytes kept, then the pool zeroed."""

    w: model.RankWeights
    buf: np.ndarray
    shape: kvpool.PoolShape
    pool: torch.Tensor
    tokens: list[int]
    kv_len: int
    before: bytes

    def kv(self) -> bytes:
        return kvpool.shard_bytes(self.buf, self.shape, list(range(self.kv_len)))


def _generated_then_wiped(prompt: list[int], new: int) -> _Wiped:
    w = model.build_weights(CFG, tp=1, rank=0)
    buf, shape, pool = _pool()
    toks = _generate(w, pool, {"r": prompt}, {"r": 0}, new)["r"]
    kv_len = len(toks) - 1
    before = kvpool.shard_bytes(buf, shape, list(range(kv_len)))
    pool.zero_()
    return _Wiped(w, buf, shape, pool, toks, kv_len, before)


def test_replay_rewrites_identical_kv():
    prompt = list(range(3, 3 + 19))
    g = _generated_then_wiped(prompt, 10)
    for a, b in schedule.pieces(0, g.kv_len, prompt_len=len(prompt), chunk_tokens=T):
        piece = model.Piece(torch.tensor(g.tokens[a:b]), a, torch.arange(b))
        model.forward(g.w, [piece], g.pool, model.LocalCollective())
    assert g.kv() == g.before


@pytest.mark.parametrize(
    ("tp", "kv_per_rank", "first"),
    [(1, 4, [0]), (2, 2, [0, 2]), (4, 1, [0, 1, 2, 3]), (8, 1, [0, 0, 1, 1, 2, 2, 3, 3])],
)
def test_kv_head_split(tp, kv_per_rank, first):
    cfg = config.ModelConfig(heads=8, kv_heads=4, ffn=256)
    assert cfg.kv_heads_per_rank(tp) == kv_per_rank
    assert [cfg.first_kv_head(tp, r) for r in range(tp)] == first


def test_bad_shapes_rejected():
    with pytest.raises(config.ConfigError):
        config.ModelConfig(heads=6, kv_heads=4)
    with pytest.raises(config.ConfigError):
        config.ModelConfig().check_tp(3)
    with pytest.raises(config.ConfigError):
        kvpool.PoolShape.for_model(CFG, tp=1, pool_slots=100, page_size=16)


def test_schedule_pieces_and_chunks():
    assert schedule.pieces(0, 20, prompt_len=18, chunk_tokens=8) == [
        (0, 8),
        (8, 16),
        (16, 18),
        (18, 19),
        (19, 20),
    ]
    assert schedule.pieces(16, 19, prompt_len=18, chunk_tokens=8) == [(16, 18), (18, 19)]
    with pytest.raises(schedule.ScheduleError):
        schedule.pieces(4, 16, prompt_len=18, chunk_tokens=8)
    with pytest.raises(schedule.ScheduleError):
        schedule.pieces(0, 12, prompt_len=18, chunk_tokens=8)
    assert list(schedule.completed_chunks(0, 8, 8)) == [0]
    assert list(schedule.completed_chunks(0, 7, 8)) == []
    assert list(schedule.completed_chunks(7, 8, 8)) == [0]
    assert list(schedule.completed_chunks(8, 24, 8)) == [1, 2]
    assert list(schedule.completed_chunks(16, 18, 8)) == []


def test_page_allocator():
    alloc = kvpool.PageAllocator(64, 16)
    assert alloc.ensure("a", 20) == list(range(32))
    assert alloc.ensure("b", 1) == list(range(32, 48))
    alloc.free("a")
    assert alloc.ensure("c", 17) == list(range(32)) and alloc.free_pages == 1
    with pytest.raises(kvpool.PoolFullError):
        alloc.ensure("b", 40)
    assert alloc.slots("b") == list(range(32, 48))


def test_rowwise_replay_equals_decode_steps():
    prompt = list(range(5, 5 + 13))
    g = _generated_then_wiped(prompt, 20)
    passes = schedule.replay_passes(0, g.kv_len, prompt_len=len(prompt), chunk_tokens=T)
    assert passes == [(0, 8, False), (8, 13, False), (13, g.kv_len, True)]
    for a, b, rowwise in passes:
        piece = model.Piece(torch.tensor(g.tokens[a:b]), a, torch.arange(b), rowwise)
        last = model.forward(g.w, [piece], g.pool, model.LocalCollective())
    assert g.kv() == g.before
    # The last row's logits give the last generated token, as the decode step did.
    assert model.greedy(g.w, last) == [g.tokens[-1]]
