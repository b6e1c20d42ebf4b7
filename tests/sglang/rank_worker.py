"""One sglang tensor-parallel rank on CPU, driven the way sglang's scheduler drives its pools.

Run as a subprocess by the tests (a real process per rank, so a rank can be killed or exit). It loads
plugins through sglang's own loader (entry point `ghostserve`), so the KV pool is created in sidecar
custody by the hook; then it schedules requests with sglang's real allocator and req_to_token pool,
writes KV with `set_kv_buffer` as the attention layers do, builds real ScheduleBatch/Req objects and
runs the plugin's capture hook after each "forward pass". The model forward itself cannot run here
(no model on CPU): the only stand-in is the worker object that hands the hook its req_to_token pool.

It serves first (prefill in chunks, then decode; prints a JSON report), then follows commands read
from stdin: `resume` (a restarted rank: a fresh pool, which the custody hook maps again, and the
scheduler-init hook reading the restorable requests from the sidecar's ledger and inserting them
into a fresh radix cache; prints a JSON report), `peer-fault` (run sglang's hooked
Scheduler.run_event_loop on a scheduler whose collective layer failed) or `exit`.
"""

from __future__ import annotations

import argparse
import array
import json
import sys
import types
import zlib

import torch

LAYERS, HEADS, HEAD_DIM, PAGE, SIZE = 2, 2, 8, 4, 128
DTYPE = torch.bfloat16
# Requests: (rid, prompt length, chunked-prefill sizes, decode steps, max_new_tokens).
REQUESTS = [("req-a", 40, [24, 16], 26, 64), ("req-b", 20, [20], 14, 64)]


def kv_values(rank: int, rid: str, layer: int, positions: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic K and V of one layer for tokens at `positions` of a request on a rank.

    A closed form of (rank, request, layer, position), so any process can recompute it; some entries
    are -0.0, inf and NaN, whose bit patterns must survive capture, parity and rebuild.
    """
    code = zlib.crc32(rid.encode()) % 997
    pos = torch.tensor(positions, dtype=torch.float64).view(-1, 1, 1)
    lane = torch.arange(HEADS * HEAD_DIM, dtype=torch.float64).view(1, HEADS, HEAD_DIM)
    base = torch.sin(0.37 * pos + 1.3 * layer + 2.1 * rank + code + 0.01 * lane) * (1 + pos % 5)
    k, v = base.to(DTYPE), (-base * 3).to(DTYPE)
    for i, p in enumerate(positions):
        if p % 17 == 3:
            k[i, 0, 0] = -0.0
        if p % 23 == 5:
            v[i, 1, 2] = float("nan")
            k[i, 1, 3] = float("inf")
    return k, v


def build(rank: int):
    from sglang.srt.mem_cache.allocator.paged import PagedTokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    pool = MHATokenToKVPool(
        size=SIZE, page_size=PAGE, dtype=DTYPE, head_num=HEADS, head_dim=HEAD_DIM,
        layer_num=LAYERS, device="cpu", enable_memory_saver=False,
    )
    allocator = PagedTokenToKVPoolAllocator(
        size=SIZE, page_size=PAGE, dtype=DTYPE, device="cpu", kvcache=pool, need_sort=False
    )
    req_to_token = ReqToTokenPool(size=8, max_context_len=256, device="cpu", enable_memory_saver=False)
    return pool, allocator, req_to_token


def serve(rank: int) -> dict[str, object]:
    from ghostserve.engine.sglang import plugin
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode
    from sglang.srt.sampling.sampling_params import SamplingParams
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    rt = plugin.RUNTIME
    assert rt is not None, "plugin did not register"
    pool, allocator, rtp = build(rank)
    assert rt.session is not None, f"pool not in custody: {rt.skipped}"
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(req_to_token_pool=rtp))

    class Layer:
        def __init__(self, layer_id: int) -> None:
            self.layer_id = layer_id

    reqs = {}
    for i, (rid, prompt_len, _, _, max_new) in enumerate(REQUESTS):
        prompt = array.array("q", [1000 * (i + 1) + t for t in range(prompt_len)])
        req = Req(rid, "", prompt, SamplingParams(max_new_tokens=max_new))
        req.kv.req_pool_idx = i
        reqs[rid] = req

    def write(req, start: int, n: int) -> torch.Tensor:
        row = req.kv.req_pool_idx
        last = rtp.req_to_token[row, start - 1].view(1) if start else torch.tensor([-1])
        prefix = torch.tensor([start])
        seq = torch.tensor([start + n])
        if n == 1 and start:
            locs = allocator.alloc_decode(seq, seq, last)
        else:
            locs = allocator.alloc_extend(prefix, prefix, seq, seq, last, n)
        rtp.req_to_token[row, start : start + n] = locs.to(torch.int32)
        positions = list(range(start, start + n))
        for layer in range(LAYERS):
            k, v = kv_values(rank, req.rid, layer, positions)
            pool.set_kv_buffer(Layer(layer), locs, k, v)
        return locs

    def run(batch_reqs, mode, spans) -> None:
        locs = torch.cat([write(r, s, n) for r, (s, n) in zip(batch_reqs, spans, strict=True)])
        batch = ScheduleBatch(reqs=batch_reqs, forward_mode=mode, spec_algorithm=SpeculativeAlgorithm.NONE)
        batch.out_cache_loc = locs
        batch.prefix_lens = [s for s, _ in spans]
        batch.extend_lens = [n for _, n in spans]
        batch.seq_lens_cpu = torch.tensor([s + n for s, n in spans])
        rt.after_forward(None, worker, batch)

    # Chunked prefill, one request per pass, then batched decode; output ids follow a fixed rule.
    for rid, _, prefill, _, _ in REQUESTS:
        done = 0
        for n in prefill:
            run([reqs[rid]], ForwardMode.EXTEND, [(done, n)])
            done += n
        reqs[rid].output_ids.append(7000 + done)
    steps = max(r[3] for r in REQUESTS)
    for step in range(steps):
        live = [reqs[r[0]] for r in REQUESTS if step < r[3]]
        spans = [(len(r.origin_input_ids) + len(r.output_ids) - 1, 1) for r in live]
        run(live, ForwardMode.DECODE, spans)
        for r in live:
            r.output_ids.append(7000 + len(r.origin_input_ids) + len(r.output_ids))
    rt.flush()  # commits go out from the rank's background sender
    return {
        "rank": rank,
        "chunks_committed": rt.chunks_committed,
        "commits_sent": rt.session.commits_sent,
        "requests": {
            rid: {
                "tokens": [int(x) for x in list(r.origin_input_ids) + list(r.output_ids)],
                "prompt": len(r.origin_input_ids),
                "slots": [
                    int(x) for x in rtp.req_to_token[r.kv.req_pool_idx, : rt.protector.tracker.written(rid)]
                ],
                "committed": rt.protector.tracker.committed(rid),
                "max_new_tokens": r.sampling_params.max_new_tokens,
            }
            for rid, r in reqs.items()
        },
    }


def peer_fault() -> None:
    """Run sglang's (hooked) Scheduler.run_event_loop on a scheduler whose collective layer failed."""
    import torch.distributed
    from sglang.srt.managers.scheduler import Scheduler

    class BrokenScheduler:
        def __getattr__(self, name: str) -> object:
            raise torch.distributed.DistBackendError("NCCL communicator was aborted on rank 1")

    Scheduler.run_event_loop(BrokenScheduler())


def resume(rank: int) -> dict[str, object]:
    """A restarted rank: pool mapped by the custody hook, then the scheduler-init hook reads the
    restorable requests from the sidecar (DescribeGroup, DescribeRequest) and inserts them into a fresh
    radix cache; reports what it restored and what sglang now matches."""
    from ghostserve.engine.sglang import plugin
    from ghostserve.engine.sglang import resume as resume_mod
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey

    rt = plugin.RUNTIME
    assert rt is not None
    # What a restarted scheduler process starts with: no session, no tracked requests. (The hooks are
    # bound to this runtime object, so it is reset in place rather than replaced.)
    rt.__init__(rt.settings)
    pool, allocator, rtp = build(rank)
    assert rt.session is not None, f"pool not in custody: {rt.skipped}"
    params = CacheInitParams(
        disable=False, req_to_token_pool=rtp, token_to_kv_pool_allocator=allocator, page_size=PAGE
    )
    tree = RadixCache(params)
    free_before = allocator.available_size()
    # The scheduler-init hook, on the parts of a Scheduler it reads (a Scheduler needs a model).
    scheduler = types.SimpleNamespace(
        server_args=types.SimpleNamespace(speculative_algorithm=None),
        token_to_kv_pool_allocator=allocator,
        tree_cache=tree,
    )
    rt.after_scheduler_init(None, scheduler)
    out: dict[str, object] = {"rank": rank, "requests": {}, "tree_tokens": int(tree.total_size())}
    plans = {p.request_id: p for p in rt.readmissions}
    for r in rt.restored:
        plan = plans[r.request_id]
        assert plan == resume_mod.plan(r, page_size=PAGE)
        match = tree.match_prefix(MatchPrefixParams(key=RadixKey(array.array("q", plan.input_ids))))
        gen = resume_mod.generate_request(plan, {"temperature": 0.0})
        slots = match_slots(tree, plan)
        at = torch.tensor(slots)
        k = [pool.k_buffer[layer][at].view(torch.uint8).flatten().tolist() for layer in range(LAYERS)]
        v = [pool.v_buffer[layer][at].view(torch.uint8).flatten().tolist() for layer in range(LAYERS)]
        expect_k, expect_v = [], []
        for layer in range(LAYERS):
            ek, ev = kv_values(rank, r.request_id, layer, list(range(len(slots))))
            expect_k.append(ek.view(torch.uint8).flatten().tolist())
            expect_v.append(ev.view(torch.uint8).flatten().tolist())
        out["requests"][r.request_id] = {  # type: ignore[index]
            "token_ids": list(r.token_ids),
            "prompt_tokens": r.prompt_tokens,
            "slots": list(r.slots),
            "restored_max_new_tokens": r.max_new_tokens,
            "matched": int(match.device_prefix_len),
            "cached_tokens": plan.cached_tokens,
            "max_new_tokens": plan.max_new_tokens,
            "gen_rid": gen.rid,
            "gen_input_len": len(gen.input_ids),
            "gen_max_new_tokens": gen.sampling_params["max_new_tokens"],
            "matched_slots": slots,
            "kv_equal": k == expect_k and v == expect_v,
        }
    out["claimed"] = free_before - allocator.available_size()
    return out


def match_slots(tree, plan) -> list[int]:
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    key = RadixKey(array.array("q", plan.input_ids))
    node = tree.match_prefix(MatchPrefixParams(key=key)).last_device_node
    parts = []
    while node is not None and node is not tree.root_node:
        parts.append([int(x) for x in node.value.tolist()])
        node = node.parent
    return [s for part in reversed(parts) for s in part]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rank", type=int, required=True)
    args = p.parse_args()
    from sglang.srt.plugins import load_plugins

    load_plugins()
    print("REPORT " + json.dumps(serve(args.rank)), flush=True)
    # Then commands from the test, one JSON object per line: resume, peer-fault or exit.
    for line in sys.stdin:
        command = json.loads(line)
        if command["cmd"] == "resume":
            print("REPORT " + json.dumps(resume(args.rank)), flush=True)
        elif command["cmd"] == "peer-fault":
            peer_fault()
        else:
            return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
