"""Per-request protection against a real sidecar: same-rid resume, superseded and expired restored
requests, and rejections that degrade one request instead of raising into sglang.

Real: the sidecar process, sglang's Req, ScheduleBatch, ReqToTokenPool, RadixCache and paged allocator.
"""

from __future__ import annotations

import array
from collections.abc import Iterator

import pytest
import sgl_procs

if sgl_procs.sglang_version() != "0.5.23":
    pytest.skip("needs sglang 0.5.23 (.venv-sglang)", allow_module_level=True)

import torch
from ghostserve.engine import adapter
from ghostserve.engine.sglang import metrics, protector, resume
from ghostserve.kernels import layout as layout_mod
from ghostserve.v1 import sidecar_pb2 as pb
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

T, PAGE, SIZE = 4, 4, 60
LAYOUT = layout_mod.KVLayout(2, 1, 8, "float16", PAGE, SIZE + PAGE)


@pytest.fixture
def prot(sidecar: sgl_procs.Sidecar) -> Iterator[protector.Protector]:
    client = sgl_procs.client_mod.SidecarClient(sidecar.address, timeout=30.0)
    session = adapter.SidecarSession(client, "prot", rank=0, world_size=1, layout=LAYOUT,
                                     protection=adapter.Protection("none", chunk_tokens=T))
    session.attach()
    yield protector.Protector(session, grace_passes=3)
    client.delete_group(group="prot")
    client.close()


def cache() -> tuple[RadixCache, PagedTokenToKVPoolAllocator, ReqToTokenPool]:
    pool = MHATokenToKVPool(size=SIZE, page_size=PAGE, dtype=torch.float16, head_num=1, head_dim=8,
                            layer_num=2, device="cpu", enable_memory_saver=False)
    alloc = PagedTokenToKVPoolAllocator(size=SIZE, page_size=PAGE, dtype=torch.float16, device="cpu",
                                        kvcache=pool, need_sort=False)
    rtp = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    global RTP
    RTP = rtp
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=alloc,
                                      page_size=PAGE))
    return tree, alloc, rtp


def make_req(rid: str, tokens: list[int], row: int, budget: int) -> Req:
    req = Req(rid, "", array.array("q", tokens), SamplingParams(max_new_tokens=budget))
    req.kv.req_pool_idx = row
    return req


RTP: ReqToTokenPool | None = None  # the pool `batch` writes slots into, as sglang's allocator does


def batch(reqs: list[Req], mode: ForwardMode, spans: list[tuple[int, int]], locs: list[int]) -> ScheduleBatch:
    if RTP is not None:
        at = 0
        for req, (start, n) in zip(reqs, spans, strict=True):
            RTP.req_to_token[req.kv.req_pool_idx, start : start + n] = torch.tensor(locs[at : at + n])
            at += n
    b = ScheduleBatch(reqs=reqs, forward_mode=mode, spec_algorithm=SpeculativeAlgorithm.NONE)
    b.out_cache_loc = torch.tensor(locs, dtype=torch.int64)
    b.prefix_lens = [s for s, _ in spans]
    b.extend_lens = [n for _, n in spans]
    b.seq_lens_cpu = torch.tensor([s + n for s, n in spans])
    return b


def ledger_of(prot: protector.Protector, rid: str) -> pb.RequestLedger:
    return prot.session.client.describe_request(group="prot", request_id=rid)


def restore(
    prot: protector.Protector, tree: RadixCache, alloc: PagedTokenToKVPoolAllocator
) -> list[resume.Pin]:
    records, dropped = resume.read_restored(prot.session.client, "prot")
    assert dropped == []
    pins = resume.restore_all(tree, alloc, records)
    prot.adopt(pins, tree_cache=tree, allocator=alloc)
    return pins


def test_same_rid_resume_keeps_the_ledger_and_commits_only_new_chunks(prot: protector.Protector) -> None:
    c = prot.session.client
    # What the crashed server left: chunks 0 and 1 of "r" (prompt 6, budget 10) at slots 8..15.
    for i in range(2):
        c.commit_chunk(group="prot", rank=0, request_id="r", chunk_index=i,
                       slots=list(range(8 + 4 * i, 12 + 4 * i)),
                       token_ids=list(range(100 + 4 * i, 104 + 4 * i)))
    c.record_tokens(group="prot", request_id="r", token_ids=list(range(100, 106)), prompt_tokens=6,
                    max_new_tokens=10)
    tree, alloc, rtp = cache()
    (pin,) = restore(prot, tree, alloc)
    assert pin.inserted == 8 and tree.protected_size() == 8  # pinned until the request is released

    # The gateway resubmits "r": prompt + the 4 tokens its client received, budget 10 - 4.
    req = make_req("r", list(range(100, 110)), 0, budget=6)
    rtp.req_to_token[0, :8] = torch.arange(8, 16, dtype=torch.int32)  # sglang matched the pinned prefix
    prot.on_forward(batch([req], ForwardMode.EXTEND, [(8, 2)], [20, 21]), rtp.req_to_token)
    for step, slot in enumerate([22, 23]):
        req.output_ids.append(110 + step)
        prot.on_forward(batch([req], ForwardMode.DECODE, [(10 + step, 1)], [slot]), rtp.req_to_token)
    req.output_ids.append(112)
    prot.on_forward(batch([req], ForwardMode.DECODE, [(12, 1)], [24]), rtp.req_to_token)
    prot.sender.drain()
    assert prot.unprotected == {} and prot.sender.rejected == 0
    got = ledger_of(prot, "r")
    assert (got.prompt_tokens, got.max_new_tokens) == (6, 10)  # not the resubmission's 10 and 6
    assert [list(ch.slots) for ch in got.chunks] == [[8, 9, 10, 11], [12, 13, 14, 15], [20, 21, 22, 23]]
    assert list(got.token_ids)[:12] == list(range(100, 112))

    prot.on_release(req)  # finished: the pin goes, and so does the ledger entry
    prot.sender.drain()
    assert tree.protected_size() == 0 and "r" not in prot.pins
    assert [r.request_id for r in c.describe_group(group="prot").requests] == []


def test_superseded_and_expired_restored_requests_are_released(prot: protector.Protector) -> None:
    c = prot.session.client
    for rid, base in (("old", 200), ("stale", 300)):
        c.commit_chunk(group="prot", rank=0, request_id=rid, chunk_index=0,
                       slots=[8, 9, 10, 11] if rid == "old" else [16, 17, 18, 19],
                       token_ids=list(range(base, base + 4)))
        c.record_tokens(group="prot", request_id=rid, token_ids=list(range(base, base + 5)), prompt_tokens=5,
                        max_new_tokens=8)
    tree, alloc, rtp = cache()
    assert len(restore(prot, tree, alloc)) == 2
    # A client retries "old" itself, under a new rid, with everything it had received.
    new = make_req("new", list(range(200, 206)), 1, budget=4)
    prot.on_forward(batch([new], ForwardMode.EXTEND, [(0, 6)], [24, 25, 26, 27, 28, 29]), rtp.req_to_token)
    prot.sender.drain()
    assert "old" not in prot.pins and "stale" in prot.pins
    assert sorted(r.request_id for r in c.describe_group(group="prot").requests) == ["stale"]
    # Nobody resubmits "stale": after the grace period (3 passes) its entry and pin go.
    for step in range(3):
        new.output_ids.append(1)
        prot.on_forward(batch([new], ForwardMode.DECODE, [(6 + step, 1)], [30 + step]), rtp.req_to_token)
    prot.sender.drain()
    assert prot.pins == {} and tree.protected_size() == 0
    assert [r.request_id for r in c.describe_group(group="prot").requests] == ["new"]
    prot.on_release(new)
    prot.sender.drain()
    assert [r.request_id for r in c.describe_group(group="prot").requests] == []


def test_a_sidecar_rejection_leaves_that_request_unprotected_and_serving(prot: protector.Protector) -> None:
    c = prot.session.client
    # Another incarnation committed chunk 0 of "x" at other slots: ours will be refused (INVALID_ARGUMENT).
    c.commit_chunk(group="prot", rank=0, request_id="x", chunk_index=0, slots=[40, 41, 42, 43],
                   token_ids=[1, 2, 3, 4])
    _, _, rtp = cache()
    x = make_req("x", [1, 2, 3, 4, 5, 6, 7, 8], 0, budget=4)
    y = make_req("y", [9, 9, 9, 9], 1, budget=4)
    before = metrics.UNPROTECTED.labels(reason="rejected")._value.get()
    prot.on_forward(batch([x, y], ForwardMode.EXTEND, [(0, 8), (0, 4)], [*range(8, 16), *range(16, 20)]),
                    rtp.req_to_token)
    x.output_ids.append(9)
    y.output_ids.append(9)
    step = batch([x, y], ForwardMode.DECODE, [(8, 1), (4, 1)], [24, 25])
    prot.on_forward(step, rtp.req_to_token)  # raises nothing
    prot.sender.drain()
    assert set(prot.unprotected) == {"x"} and prot.off is None
    assert metrics.UNPROTECTED.labels(reason="rejected")._value.get() == before + 1
    # Its entry is dropped (it can no longer be trusted) and its later chunks are not sent; the other
    # request stays protected.
    for _ in range(4):
        x.output_ids.append(5)
    prot.on_forward(batch([x], ForwardMode.EXTEND, [(9, 4)], [28, 29, 30, 31]), rtp.req_to_token)
    prot.on_forward(batch([x], ForwardMode.DECODE, [(13, 1)], [32]), rtp.req_to_token)
    prot.sender.drain()
    assert [r.request_id for r in c.describe_group(group="prot").requests] == ["y"]
    assert [list(ch.slots) for ch in ledger_of(prot, "y").chunks] == [[16, 17, 18, 19]]
    for req in (x, y):
        prot.on_release(req)
    prot.sender.drain()
    assert [r.request_id for r in c.describe_group(group="prot").requests] == []


def test_chunks_are_committed_at_the_slots_sglang_settles_on(prot: protector.Protector) -> None:
    # sglang caches a running request's prefill in the radix cache; where the tree already held the same
    # tokens it re-points the request at the tree's slots and frees the request's own ones. The chunk
    # goes to the ledger with the slots the request holds after that, never with the freed ones.
    _, _, rtp = cache()
    req = make_req("m", [1, 2, 3, 4, 5], 0, budget=4)
    prot.on_forward(batch([req], ForwardMode.EXTEND, [(0, 5)], [8, 9, 10, 11, 12]), rtp.req_to_token)
    rtp.req_to_token[0, :4] = torch.tensor([40, 41, 42, 43])  # sglang's cache_unfinished_req re-bind
    req.output_ids.append(6)
    prot.on_forward(batch([req], ForwardMode.DECODE, [(5, 1)], [13]), rtp.req_to_token)
    prot.sender.drain()
    assert prot.unprotected == {}
    assert [list(ch.slots) for ch in ledger_of(prot, "m").chunks] == [[40, 41, 42, 43]]
    # Should a committed chunk still move later (not seen in sglang 0.5.23), the request is served
    # unprotected and its entry dropped rather than left pointing at freed slots.
    for step in range(2):  # the pass writing token 7 completes and commits chunk 1
        req.output_ids.append(7)
        prot.on_forward(batch([req], ForwardMode.DECODE, [(6 + step, 1)], [14 + step]), rtp.req_to_token)
    rtp.req_to_token[0, 4:8] = torch.tensor([50, 51, 52, 53])
    req.output_ids.append(8)
    prot.on_forward(batch([req], ForwardMode.DECODE, [(8, 1)], [16]), rtp.req_to_token)
    prot.sender.drain()
    assert prot.unprotected["m"].startswith("sglang moved chunk 1")
    assert [r.request_id for r in prot.session.client.describe_group(group="prot").requests] == []
