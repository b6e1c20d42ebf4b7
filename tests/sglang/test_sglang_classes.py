"""The plugin against sglang's real classes in this process: pools, custody, capture, resume, loader.

The end-to-end flow across processes is in test_end_to_end.py; here each piece is checked on its own,
with dtypes, refusals and bad input.
"""

from __future__ import annotations

import array
import importlib.metadata
import types

import numpy as np
import pytest
import sgl_procs
from ghostserve.engine import adapter
from ghostserve.kernels import layout as layout_mod
from ghostserve.v1 import sidecar_pb2 as pb

# By distribution, not by import: this folder (tests/sglang) is itself importable as a namespace `sglang`.
if sgl_procs.sglang_version() is None:
    pytest.skip("sglang is not installed (run scripts/setup-sglang.sh)", allow_module_level=True)

import torch
from ghostserve.engine.sglang import capture, chunks, plugin, pools, resume, runtime
from ghostserve.engine.sglang import settings as settings_mod
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, MLATokenToKVPool, ReqToTokenPool
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey
from sglang.srt.model_executor.forward_batch_info import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams
from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

pytestmark = pytest.mark.sglang
PAGE, SIZE, LAYERS, HEADS, DIM = 4, 60, 3, 2, 8


class Layer:
    def __init__(self, layer_id: int) -> None:
        self.layer_id = layer_id


def make_pool(dtype: torch.dtype, **kw: object) -> MHATokenToKVPool:
    return MHATokenToKVPool(
        size=SIZE, page_size=PAGE, dtype=dtype, head_num=HEADS, head_dim=DIM, layer_num=LAYERS,
        device="cpu", enable_memory_saver=False, **kw,
    )


def session(sc: sgl_procs.Sidecar, layout: layout_mod.KVLayout, *, group: str) -> adapter.SidecarSession:
    return adapter.SidecarSession(
        sgl_procs.client_mod.SidecarClient(sc.address, timeout=30.0), group, rank=0, world_size=2,
        layout=layout, protection=adapter.Protection("xor", chunk_tokens=8),
    )


@pytest.mark.parametrize(
    ("dtype", "name"),
    [(torch.float16, "float16"), (torch.bfloat16, "bfloat16"), (torch.float8_e4m3fn, "float8"),
     (torch.float32, "float32")],
)
def test_describe_mha_pool(dtype: torch.dtype, name: str) -> None:
    layout = pools.describe(make_pool(dtype))
    assert layout == layout_mod.KVLayout(LAYERS, HEADS, DIM, name, PAGE, SIZE + PAGE)


def test_custody_pool_is_what_set_kv_buffer_writes(sidecar: sgl_procs.Sidecar) -> None:
    """For every dtype: sglang's set_kv_buffer lands in the sidecar's segment in the contract layout."""
    for dtype in (torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float32):
        pool = make_pool(dtype)
        layout = pools.describe(pool)
        sess = session(sidecar, layout, group=f"dtype-{layout.dtype}")
        result = pools.take_custody(pool, sess)
        assert result.created
        assert pool.k_buffer[0].shape == (SIZE + PAGE, HEADS, DIM)
        assert pool.k_buffer[0].dtype == pool.store_dtype
        slots = torch.tensor([4, 5, 6, 7, 20, 21, 22, 23])
        written = []
        for layer in range(LAYERS):
            k = torch.randn(len(slots), HEADS, DIM) * 50
            v = torch.randn(len(slots), HEADS, DIM) * 50
            k[0, 0, 0], v[1, 0, 1] = -0.0, float("inf")
            pool.set_kv_buffer(Layer(layer), slots, k.to(dtype), v.to(dtype))
            # set_kv_buffer converts to the pool dtype and stores fp8 as uint8: compare stored bytes.
            written += [k.to(dtype).view(torch.uint8).reshape(len(slots), -1),
                        v.to(dtype).view(torch.uint8).reshape(len(slots), -1)]
        # Read through an independent mapping of the sidecar's segment, as the sidecar's encoder does.
        mm, arr = pools.sidecar_pools.map_pool(result.pool)
        shard = np.zeros(layout.shard_nbytes(len(slots)), dtype=np.uint8)
        layout_mod.gather_shard(arr, layout, slots.numpy(), shard)
        np.testing.assert_array_equal(shard.reshape(2 * LAYERS, len(slots), -1), torch.stack(written).numpy())
        del arr
        mm.close()
        with sgl_procs.client_mod.SidecarClient(sidecar.address) as c:
            c.delete_group(group=f"dtype-{layout.dtype}")


def test_unsupported_pools_are_refused_with_reasons() -> None:
    mla = MLATokenToKVPool(
        size=SIZE, page_size=PAGE, dtype=torch.bfloat16, kv_lora_rank=16, qk_rope_head_dim=8,
        layer_num=2, device="cpu", enable_memory_saver=False,
    )
    with pytest.raises(pools.UnsupportedPoolError, match=r"MLA KV pool.*identical on every rank"):
        pools.describe(mla)
    # In a scheduler: the MLA pool never reaches the custody hook; scheduler init logs why it is off.
    rt = runtime.Runtime(settings_mod.PluginSettings.from_env({"GHOSTSERVE_SGLANG": "1"}))
    sched = types.SimpleNamespace(
        server_args=types.SimpleNamespace(speculative_algorithm=None),
        token_to_kv_pool_allocator=types.SimpleNamespace(get_kvcache=lambda: mla),
    )
    rt.after_scheduler_init(None, sched)
    assert rt.session is None and rt.skipped is not None and "MLA" in rt.skipped
    pool = make_pool(torch.bfloat16, v_head_dim=4)
    with pytest.raises(pools.UnsupportedPoolError, match="V head dim"):
        pools.describe(pool)


def test_gpu_custody_is_declared_not_implemented(sidecar: sgl_procs.Sidecar) -> None:
    pool = make_pool(torch.float16)
    layout = pools.describe(pool)
    pool.device = "cuda:0"  # the only GPU-specific input of the seam
    with pytest.raises(pools.CustodyError, match=r"CUDA VMM.*not implement"):
        pools.take_custody(pool, session(sidecar, layout, group="gpu"))
    with sgl_procs.client_mod.SidecarClient(sidecar.address) as c:
        assert "gpu" not in c.list_groups().groups  # refused before attaching: nothing changed


def real_batch(reqs: list[Req], mode: ForwardMode, spans: list[tuple[int, int]], locs: list[int],
               spec: SpeculativeAlgorithm = SpeculativeAlgorithm.NONE) -> ScheduleBatch:
    batch = ScheduleBatch(reqs=reqs, forward_mode=mode, spec_algorithm=spec)
    batch.out_cache_loc = torch.tensor(locs, dtype=torch.int64)
    batch.prefix_lens = [s for s, _ in spans]
    batch.extend_lens = [n for _, n in spans]
    batch.seq_lens_cpu = torch.tensor([s + n for s, n in spans])
    return batch


def make_req(rid: str, prompt: list[int], row: int) -> Req:
    req = Req(rid, "", array.array("q", prompt), SamplingParams(max_new_tokens=8))
    req.kv.req_pool_idx = row
    return req


def test_capture_spans_from_real_batches() -> None:
    a, b = make_req("a", list(range(10)), 0), make_req("b", list(range(50, 56)), 1)
    rtp = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    rtp.req_to_token[0, :4] = torch.tensor([40, 41, 42, 43], dtype=torch.int32)  # a's radix-cache prefix
    tracker = chunks.ChunkTracker(4)
    got: list[chunks.Chunk] = []
    # Mixed extend: a extends 6 tokens after a cached 4-token prefix, b prefills 6 tokens.
    locs = [8, 9, 10, 11, 12, 13, 16, 17, 18, 19, 20, 21]
    batch = real_batch([a, b], ForwardMode.EXTEND, [(4, 6), (0, 6)], locs)
    owners: list[str] = []

    def commit(c: chunks.Chunk, req: Req) -> None:
        got.append(c)
        owners.append(req.rid)

    rtp.req_to_token[0, 4:10] = torch.tensor(locs[:6], dtype=torch.int32)  # what sglang's allocator writes
    rtp.req_to_token[1, 0:6] = torch.tensor(locs[6:], dtype=torch.int32)
    n = capture.capture_batch(batch, tracker=tracker, req_to_token=rtp.req_to_token, commit=commit)
    # Only the radix-cache prefix's chunk: chunks holding tokens this extend pass wrote wait one pass,
    # since sglang may move those tokens onto the tree's slots once the pass is done.
    assert n == 1 and owners == ["a"]  # the request itself goes with its chunk (prompt length, budget)
    assert [(c.request_id, c.index, c.slots) for c in got] == [("a", 0, (40, 41, 42, 43))]
    rtp.req_to_token[0, 4:8] = torch.tensor([44, 45, 46, 47], dtype=torch.int32)  # sglang re-bound them
    a.output_ids.append(99)
    b.output_ids.append(98)
    step1 = real_batch([a, b], ForwardMode.DECODE, [(10, 1), (6, 1)], [14, 22])
    rtp.req_to_token[0, 10], rtp.req_to_token[1, 6] = 14, 22
    assert capture.capture_batch(step1, tracker=tracker, req_to_token=rtp.req_to_token,
                                 commit=commit) == 2
    assert [(c.request_id, c.index, c.slots) for c in got[1:]] == [
        ("a", 1, (44, 45, 46, 47)), ("b", 0, (16, 17, 18, 19))]  # slots as they are now, not as written
    assert got[1].token_ids == (4, 5, 6, 7)
    a.output_ids.append(96)
    b.output_ids.append(97)
    step2 = real_batch([a, b], ForwardMode.DECODE, [(11, 1), (7, 1)], [15, 23])
    rtp.req_to_token[0, 11], rtp.req_to_token[1, 7] = 15, 23
    assert capture.capture_batch(step2, tracker=tracker, req_to_token=rtp.req_to_token,
                                 commit=commit) == 2  # decode writes are final: committed at once
    assert got[3:] == [chunks.Chunk("a", 2, (12, 13, 14, 15), (8, 9, 99, 96)),
                       chunks.Chunk("b", 1, (20, 21, 22, 23), (54, 55, 98, 97))]


def test_capture_refuses_speculative_batches_and_bad_locs() -> None:
    a = make_req("a", [1, 2, 3], 0)
    spec = real_batch([a], ForwardMode.EXTEND, [(0, 3)], [4, 5, 6], spec=SpeculativeAlgorithm.EAGLE)
    with pytest.raises(capture.SpeculativeDecodingError, match="speculative decoding"):
        capture.written_spans(spec)
    short = real_batch([a], ForwardMode.EXTEND, [(0, 3)], [4, 5])
    with pytest.raises(ValueError, match="out_cache_loc holds 2 slots"):
        capture.written_spans(short)
    rt = runtime.Runtime(settings_mod.PluginSettings.from_env({"GHOSTSERVE_SGLANG": "1"}))
    sched = types.SimpleNamespace(server_args=types.SimpleNamespace(speculative_algorithm="EAGLE"))
    with pytest.raises(capture.SpeculativeDecodingError, match="--speculative-algorithm"):
        rt.after_scheduler_init(None, sched)


def tree_and_allocator() -> tuple[RadixCache, PagedTokenToKVPoolAllocator]:
    pool = make_pool(torch.float16)
    alloc = PagedTokenToKVPoolAllocator(size=SIZE, page_size=PAGE, dtype=torch.float16, device="cpu",
                                        kvcache=pool, need_sort=False)
    rtp = ReqToTokenPool(size=4, max_context_len=64, device="cpu", enable_memory_saver=False)
    tree = RadixCache(CacheInitParams(disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=alloc,
                                      page_size=PAGE))
    return tree, alloc


def test_resume_inserts_at_recorded_slots_and_plans_readmission() -> None:
    tree, alloc = tree_and_allocator()
    tokens = tuple(range(300, 315))  # 10 prompt + 5 generated
    slots = (24, 25, 26, 27, 8, 9, 10, 11)
    restored = resume.RestoredRequest("r", tokens, 10, slots, max_new_tokens=12)
    plan = resume.plan(restored, page_size=PAGE)
    assert plan == resume.Readmission("r", list(tokens), 7, 8)
    free = alloc.available_size()
    pin = resume.insert(tree, alloc, restored, plan)
    assert pin.inserted == 8 and pin.held == []
    assert alloc.available_size() == free - 8
    match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array.array("q", tokens))))
    assert match.device_prefix_len == 8
    assert match.last_device_node.value.tolist() == list(slots)  # one node, at the recorded slots
    # Pinned: eviction cannot hand the restored slots to another request until the pin goes.
    assert tree.evictable_size() == 0 and tree.protected_size() == 8
    resume.release_pin(tree, alloc, pin)
    assert tree.evictable_size() == 8 and tree.protected_size() == 0
    req = resume.generate_request(plan, {"temperature": 0.0})
    assert req.rid == "r" and req.input_ids == list(tokens)
    assert req.sampling_params == {"temperature": 0.0, "max_new_tokens": 7}


def test_resume_refuses_slots_in_use_and_changes_nothing() -> None:
    tree, alloc = tree_and_allocator()
    used = alloc.alloc(PAGE)  # sglang handed this page out already
    before = alloc.free_pages.clone()
    clash = resume.RestoredRequest("r", tuple(range(9)), 4, (*[int(x) for x in used], 40, 41, 42, 43), 20)
    with pytest.raises(resume.ResumeError, match="already in use"):
        clash_plan = resume.plan(clash, page_size=PAGE)
        assert clash_plan is not None
        resume.insert(tree, alloc, clash, clash_plan)
    partial = resume.RestoredRequest("p", tuple(range(9)), 4, (40, 41, 42, 44), 20)
    with pytest.raises(resume.ResumeError, match="whole pages"):
        resume.claim_slots(alloc, partial.slots)
    with pytest.raises(resume.ResumeError, match="outside"):
        resume.claim_slots(alloc, [0, 1, 2, 3])  # the padding page is never allocatable
    assert torch.equal(alloc.free_pages, before)
    assert tree.total_size() == 0
    done = resume.RestoredRequest("d", tuple(range(9)), 4, (), max_new_tokens=5)
    assert resume.plan(done, page_size=PAGE) is None  # generated its whole budget: nothing to re-admit
    with pytest.raises(resume.ResumeError, match="prompt_tokens"):
        resume.RestoredRequest("x", (1, 2), 3, (), 4)


def test_entry_point_and_version_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="sglang.srt.plugins")}
    assert eps["ghostserve"] == "ghostserve.engine.sglang.plugin:register"
    from sglang.srt.plugins import hook_registry

    monkeypatch.delenv("GHOSTSERVE_SGLANG", raising=False)
    plugin.register()  # installed but not enabled: inert
    assert plugin.RUNTIME is None
    assert not any(target.startswith("sglang.srt") and "ghostserve" in repr(hooks)
                   for target, hooks in hook_registry.HookRegistry._hooks.items())
    monkeypatch.setenv("GHOSTSERVE_SGLANG", "1")
    from ghostserve.engine.sglang import compat

    monkeypatch.setattr(compat, "installed_version", lambda: "0.6.0")
    with pytest.raises(SystemExit, match=r"sglang 0\.6\.0 is not supported"):
        plugin.register()
    assert plugin.RUNTIME is None
    monkeypatch.setenv("GHOSTSERVE_CHUNK_TOKENS", "lots")
    with pytest.raises(SystemExit, match="GHOSTSERVE_CHUNK_TOKENS"):
        plugin.register()


def test_second_pool_or_composite_cache_is_refused(sidecar: sgl_procs.Sidecar) -> None:
    env = {"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_SIDECAR": sidecar.address, "GHOSTSERVE_GROUP": "two",
           "GHOSTSERVE_CHUNK_TOKENS": "8", "GHOSTSERVE_RANK": "0", "GHOSTSERVE_WORLD_SIZE": "1"}
    rt = runtime.Runtime(settings_mod.PluginSettings.from_env(env))
    first = make_pool(torch.float16)
    original = MHATokenToKVPool._create_buffers_normal
    assert rt.create_buffers(original, first) is None  # in custody now
    assert rt.session is not None and pools.pool_bytes(first).nbytes >= rt.session.layout.pool_nbytes
    with pytest.raises(pools.UnsupportedPoolError, match="second KV pool"):
        rt.create_buffers(original, make_pool(torch.float16))
    composite = types.SimpleNamespace(
        server_args=types.SimpleNamespace(speculative_algorithm=None),
        token_to_kv_pool_allocator=types.SimpleNamespace(get_kvcache=lambda: object()),
    )
    with pytest.raises(pools.UnsupportedPoolError, match="composite KV cache"):
        rt.after_scheduler_init(None, composite)
    rt.session.client.close()
    with sgl_procs.client_mod.SidecarClient(sidecar.address) as c:
        c.delete_group(group="two")


def ledger(chunk_valid: list[bool], **fields: object) -> pb.RequestLedger:
    """A DescribeRequest reply: chunk i at slots [40 + 4i, 44 + 4i), valid as given."""
    chunk_list = [pb.ChunkLedger(chunk_index=i, slots=list(range(40 + 4 * i, 44 + 4 * i)), state=pb.PROTECTED,
                                 kv_valid=ok) for i, ok in enumerate(chunk_valid)]
    base: dict[str, object] = {"group": "g", "request_id": "a", "token_ids": list(range(13)),
                               "prompt_tokens": 4, "chunk_tokens": 4, "max_new_tokens": 10}
    base.update(fields)
    return pb.RequestLedger(chunks=chunk_list, **base)  # type: ignore[arg-type]


def test_resume_from_ledger() -> None:
    # Chunks 0 and 1 are valid, 2 must be recomputed, so 3 (valid) is past the restored prefix.
    record = resume.from_ledger(ledger([True, True, False, True]))
    assert record == resume.RestoredRequest("a", tuple(range(13)), 4, tuple(range(40, 48)), 10)
    # Slots are cut to the recorded tokens.
    short = resume.from_ledger(ledger([True, True], token_ids=list(range(6))))
    assert short is not None and short.slots == (40, 41, 42, 43, 44, 45)
    # Nothing valid: the whole request is recomputed.
    nothing = resume.from_ledger(ledger([False, True]))
    assert nothing is not None and nothing.slots == ()
    # Prompt length and budget not recorded yet (rank 0's RecordTokens had not arrived): the KV is still
    # restored, the client's resubmission carries the budget.
    unknown = resume.from_ledger(ledger([True], max_new_tokens=0, prompt_tokens=0))
    assert unknown is not None and unknown.slots == (40, 41, 42, 43)
    assert resume.plan(unknown, page_size=PAGE) == resume.Readmission("a", list(range(13)), 0, 4)
    assert resume.from_ledger(ledger([True], token_ids=[])) is None
    bad = ledger([True])
    bad.chunks[0].slots.append(99)
    with pytest.raises(resume.ResumeError, match="chunk 0 has 5 slots"):
        resume.from_ledger(bad)
    tree, alloc = tree_and_allocator()
    done = resume.from_ledger(ledger([True], request_id="done", max_new_tokens=9))  # 9 generated already
    assert record is not None and done is not None
    pins = resume.restore_all(tree, alloc, [record, done])
    assert [(p.readmission.request_id, p.readmission.cached_tokens, p.readmission.max_new_tokens)
            for p in pins] == [("a", 8, 1)]
    assert tree.total_size() == 8


def test_rank_comes_from_sglang_or_settings() -> None:
    rt = runtime.Runtime(settings_mod.PluginSettings.from_env({"GHOSTSERVE_SGLANG": "1"}))
    with pytest.raises(pools.CustodyError, match="tensor-parallel state is not initialized"):
        rt.rank_and_size()  # no torch.distributed in this process, and no GHOSTSERVE_RANK
    env = {"GHOSTSERVE_SGLANG": "1", "GHOSTSERVE_RANK": "3", "GHOSTSERVE_WORLD_SIZE": "4"}
    assert runtime.Runtime(settings_mod.PluginSettings.from_env(env)).rank_and_size() == (3, 4)
