"""Sidecar benchmark: what the service costs on top of the bare codec, measured side by side on the same
pools in one run.

  commit->parity: chunks committed by every rank over gRPC (Unix socket) until Flush reports them
                  protected, vs `Codec.encode_gather` over the same pools and slots in a loop. Two ways
                  side by side: every rank sends its chunks in one CommitChunks call (what an engine's
                  sender does with the chunks a prefill completed) and one CommitChunk call per chunk.
                  The bare loop is also timed with `checksums_out` (the service's output: parity and
                  every shard's xxh3), to tell what the hash costs from what the service adds.
  rebuild:        the Rebuild RPC (gather survivors, reconstruct, verify xxh3, scatter into the pool) vs
                  the bare `Codec.reconstruct` on pre-gathered shards, and vs reconstruct plus the
                  gather/scatter any implementation needs.
  memory:         parity bytes held per protected KV byte (M/N) plus ledger metadata per KV byte.

usage: python bench/sidecar.py [--quick] [--codes xor,rdp,rs] [--ranks 4] [--chunks 12] [--repeat 3]
Writes bench/results/sidecar-cpu-<machine>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import logging
import pathlib
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Any

import benchlib
import ghostserve.kernels
import grpc
import numpy as np
from ghostserve.kernels import cpu as kcpu
from ghostserve.kernels import layout as kvlayout
from ghostserve.sidecar import client, config, ledger, pools
from ghostserve.v1 import sidecar_pb2 as pb
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODES = {"xor": (pb.XOR, 1, 1), "rdp": (pb.RDP, 2, 2), "rs": (pb.RS, 2, 2)}  # code, M, ranks lost


def machine() -> str:
    return str(benchlib.machine()["slug"])


def best(times: list[float]) -> float:
    return min(times)


def bare_encode_one(
    codec: Any,
    pools: list[Any],
    lay: kvlayout.KVLayout,
    slot_lists: list[Any],
    parity: list[Any],
    sums: bool,
    i: int,
) -> None:
    codec.encode_gather(pools, lay, slot_lists[i], parity[i], checksums_out=[] if sums else None)


def run_code(
    name: str, args: argparse.Namespace, c: client.SidecarClient, progress: Progress
) -> dict[str, Any]:
    code, m, lost_n = CODES[name]
    n, t, chunks = args.ranks, args.chunk_tokens, args.chunks
    workers = args.encode_workers
    lay = kvlayout.KVLayout(args.layers, args.kv_heads, args.head_dim, "float16", 16, chunks * t)
    msg_layout = pb.KVLayout(
        layers=lay.layers,
        kv_heads=lay.kv_heads,
        head_dim=lay.head_dim,
        dtype=pb.FLOAT16,
        page_size=16,
        pool_slots=lay.pool_slots,
    )
    prot = pb.Protection(code=code, parity_shards=m, chunk_tokens=t)
    group = f"bench-{name}"
    maps = []
    for r in range(n):
        h = c.attach(group=group, rank=r, world_size=n, layout=msg_layout, protection=prot).pool
        mm, pool = pools.map_pool(h)
        pool[:] = np.random.default_rng(r).integers(0, 256, pool.size, dtype=np.uint8)
        maps.append((mm, pool))
    arrays = [p for _, p in maps]
    rng = np.random.default_rng(9)
    perm = rng.permutation(lay.pool_slots)
    # Pages of 16 consecutive slots in shuffled page order, as a paged allocator hands them out.
    pages = perm[perm % 16 == 0]
    slot_lists = [
        np.concatenate([np.arange(p, p + 16) for p in pages[i * (t // 16) : (i + 1) * (t // 16)]])
        for i in range(chunks)
    ]
    s = lay.shard_nbytes(t)
    kv_bytes = chunks * n * s
    codec = ghostserve.kernels.Codec(name, n, m)
    # Allocated as the sidecar allocates its parity (aligned): both sides run the same XOR kernel.
    parity = [[kcpu.aligned_empty(s, zero=True) for _ in range(m)] for _ in range(chunks)]
    task = progress.add_task(f"{name}: encode + rebuild", total=args.repeat * 4)

    rank_clients = [client.SidecarClient(c.address, timeout=120) for _ in range(n)]
    slot_py = [sl.tolist() for sl in slot_lists]

    def commit_each(rank_client: tuple[int, client.SidecarClient], rid: str) -> None:
        r, rc = rank_client
        for i, kl in enumerate(slot_py):
            rc.commit_chunk(group=group, rank=r, request_id=rid, chunk_index=i, slots=kl)

    def commit_batch(rank_client: tuple[int, client.SidecarClient], rid: str) -> None:
        r, rc = rank_client
        chunks = [pb.ChunkCommit(request_id=rid, chunk_index=i, slots=kl) for i, kl in enumerate(slot_py)]
        reply = rc.commit_chunks(group=group, rank=r, chunks=chunks)
        assert all(x.code == 0 for x in reply.results), reply

    def service_encode(commit: Any, rid: str) -> float:
        t0 = time.perf_counter()
        list(pool_ex.map(functools.partial(commit, rid=rid), enumerate(rank_clients)))
        assert c.flush(group, wait=120).drained
        took = time.perf_counter() - t0
        ledger = c.describe_request(group=group, request_id=rid)
        assert sum(x.state == pb.PROTECTED for x in ledger.chunks) == chunks, "encoder fell behind"
        return took

    pool_ex = concurrent.futures.ThreadPoolExecutor(n)
    for rc in rank_clients:  # connect before timing
        rc.list_groups()
    svc_encode, svc_single, bare_encode, svc_rebuild, bare_decode, bare_full = [], [], [], [], [], []
    bare_hashed: list[float] = []
    for rep in range(args.repeat):
        # The per-chunk path first, its parity released before the batched run takes the same buffers.
        svc_single.append(service_encode(commit_each, f"s{rep}"))
        c.release_request(group=group, request_id=f"s{rep}")
        svc_encode.append(service_encode(commit_batch, f"r{rep}"))
        progress.advance(task)

        # The bare codec gets as many threads as the sidecar's encoder (--encode-workers): a like-for-like
        # pair. It hashes nothing; the sidecar must also record every shard's checksum, so the same loop
        # with `checksums_out` is timed too: bare / that is the best any service could reach here.
        for sums, times in ((False, bare_encode), (True, bare_hashed)):
            encode_one = functools.partial(bare_encode_one, codec, arrays, lay, slot_lists, parity, sums)
            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(workers) as bare_ex:
                list(bare_ex.map(encode_one, range(len(slot_lists))))
            times.append(time.perf_counter() - t0)
        progress.advance(task)

        lost = list(range(lost_n))
        c.mark_lost(group=group, ranks=lost, reason="bench")
        t0 = time.perf_counter()
        report = c.rebuild(group=group, lost_ranks=lost, timeout=600)
        svc_rebuild.append(time.perf_counter() - t0)
        assert report.bytes_rebuilt == chunks * lost_n * s and not any(
            r.failed_chunks for r in report.requests
        )
        progress.advance(task)
        # Rebuilt pools are the new segments: map them for the bare runs (and check the bytes).
        desc = c.describe_group(group=group)
        for r in lost:
            mm, pool = pools.map_pool(desc.ranks[r].pool)
            expect = np.random.default_rng(r).integers(0, 256, pool.size, dtype=np.uint8)
            probe = slot_lists[0]
            assert np.array_equal(
                pool.reshape(lay.planes, lay.pool_slots, -1)[:, probe],
                expect.reshape(lay.planes, lay.pool_slots, -1)[:, probe],
            )
            maps[r], arrays[r] = (mm, pool), pool

        gathered = [[kcpu.aligned_empty(s) for _ in range(n)] for _ in range(chunks)]
        for i, slots in enumerate(slot_lists):
            for r in range(n):
                kvlayout.gather_shard(arrays[r], lay, slots, gathered[i][r])
        out = {r: kcpu.aligned_empty(s) for r in lost}
        t0 = time.perf_counter()
        for i in range(chunks):
            shards = [None if r in lost else gathered[i][r] for r in range(n)] + list(parity[i])
            codec.reconstruct(shards, out=out)
        bare_decode.append(time.perf_counter() - t0)
        scratch = {r: kcpu.aligned_empty(s) for r in range(n)}
        t0 = time.perf_counter()
        for i, slots in enumerate(slot_lists):
            for r in range(n):
                if r not in lost:
                    kvlayout.gather_shard(arrays[r], lay, slots, scratch[r])
            shards = [None if r in lost else scratch[r] for r in range(n)] + list(parity[i])
            codec.reconstruct(shards, out=out)
            for r in lost:
                kvlayout.scatter_shard(out[r], lay, slots, arrays[r])
        bare_full.append(time.perf_counter() - t0)
        del gathered
        progress.advance(task)
        held = c.get_stats().parity_bytes_held
        c.release_request(group=group, request_id=f"r{rep}")

    pool_ex.shutdown()
    for rc in rank_clients:
        rc.close()
    del arrays
    for mm, _ in maps:
        with contextlib.suppress(BufferError):
            mm.close()
    c.delete_group(group=group)
    lost_bytes = chunks * lost_n * s

    def ratios(bare: list[float], svc: list[float]) -> list[float]:
        # Each repeat runs the two side by side; the machine is shared, so keep every pair.
        return [b / v for b, v in zip(bare, svc, strict=True)]

    enc_r = ratios(bare_encode, svc_encode)
    hashed_r = ratios(bare_hashed, svc_encode)
    ceiling_r = ratios(bare_encode, bare_hashed)
    single_r = ratios(bare_encode, svc_single)
    reb_r = ratios(bare_full, svc_rebuild)
    return {
        "encode_ratio_median": statistics.median(enc_r),
        "encode_ratio_per_repeat": enc_r,
        "encode_ratio_vs_checksummed_median": statistics.median(hashed_r),
        "encode_ratio_vs_checksummed_per_repeat": hashed_r,
        "checksum_ceiling_median": statistics.median(ceiling_r),
        "checksum_ceiling_per_repeat": ceiling_r,
        "codec_encode_gather_checksums_GBps": kv_bytes / best(bare_hashed) / 1e9,
        "encode_ratio_per_chunk_rpc_median": statistics.median(single_r),
        "encode_ratio_per_chunk_rpc_per_repeat": single_r,
        "service_encode_per_chunk_rpc_GBps": kv_bytes / best(svc_single) / 1e9,
        "rebuild_ratio_vs_reconstruct_gather_scatter_median": statistics.median(reb_r),
        "rebuild_ratio_vs_reconstruct_gather_scatter_per_repeat": reb_r,
        "kv_bytes_per_run": kv_bytes,
        "shard_bytes": s,
        "service_encode_GBps": kv_bytes / best(svc_encode) / 1e9,
        "codec_encode_gather_GBps": kv_bytes / best(bare_encode) / 1e9,
        "encode_ratio": best(bare_encode) / best(svc_encode),
        "service_rebuild_GBps": lost_bytes / best(svc_rebuild) / 1e9,
        "codec_reconstruct_GBps": lost_bytes / best(bare_decode) / 1e9,
        "codec_reconstruct_gather_scatter_GBps": lost_bytes / best(bare_full) / 1e9,
        "rebuild_ratio_vs_reconstruct": best(bare_decode) / best(svc_rebuild),
        "rebuild_ratio_vs_reconstruct_gather_scatter": best(bare_full) / best(svc_rebuild),
        "parity_bytes_per_kv_byte": held / kv_bytes,
        "expected_parity_per_kv_byte": m / n,
        "encode_seconds_median": statistics.median(svc_encode),
    }


def metadata_per_chunk(args: argparse.Namespace) -> float:
    """Bytes of ledger metadata (Python objects + slot/token arrays + checksums) per committed chunk."""
    lg = ledger.Ledger(world_size=args.ranks, chunk_tokens=args.chunk_tokens, pool_slots=1 << 20)
    k = 200
    slots = [np.arange(i * args.chunk_tokens, (i + 1) * args.chunk_tokens, dtype=np.int64) for i in range(k)]
    tokens = np.arange(args.chunk_tokens, dtype=np.int64)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(k):
        for r in range(args.ranks):
            chunk, _ = lg.commit(r, f"req-{i % 8}", i, slots=slots[i], token_ids=tokens)
        chunk.checksums = tuple(range(2**63, 2**63 + args.ranks))
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes, 2 repeats (< 60 s)")
    p.add_argument("--codes", default="xor,rdp,rs")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--encode-workers", type=int, default=2)
    p.add_argument(
        "--out", type=pathlib.Path, default=ROOT / "bench" / "results" / f"sidecar-cpu-{machine()}.json"
    )
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.chunks, args.repeat = 4, 8, 4
    console = Console(stderr=True, width=200)
    logging.getLogger("ghostserve").setLevel(logging.ERROR)  # the table is the output
    d = pathlib.Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    prefix = f"gs-b{secrets.token_hex(3)}-"
    cfg = config.Config(
        budget_bytes=8 << 30, fake_gpus=0, encode_workers=args.encode_workers, shm_prefix=prefix
    )
    sock = d / "sidecar.sock"
    # The sidecar runs as its own process, as in production: its threads do not share a GIL with the
    # "workers" below, which commit from one thread (and channel) per rank.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ghostserve.cli.main",
            "sidecar",
            "--socket",
            str(sock),
            "--fake-nvml",
            "0",
            "--budget",
            str(cfg.budget_bytes),
            "--encode-workers",
            str(args.encode_workers),
            "--shm-prefix",
            prefix,
            "--log-level",
            "ERROR",
        ],
        cwd=ROOT,
    )
    results: dict[str, dict[str, Any]] = {}
    try:
        with (
            client.SidecarClient(f"unix://{sock}", timeout=120) as c,
            Progress(console=console) as progress,
        ):
            deadline = time.monotonic() + 60
            while True:
                try:
                    c.wait_ready(timeout=1)
                    break
                except grpc.FutureTimeoutError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        console.print("[red]the sidecar did not start")
                        return 1
            for name in args.codes.split(","):
                results[name] = run_code(name, args, c, progress)
    except grpc.RpcError as exc:
        console.print(f"[red]sidecar call failed: {exc.code()} {exc.details()}")
        return 1
    finally:
        proc.terminate()
        proc.wait(60)
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    meta = metadata_per_chunk(args)
    s = args.layers * 2 * args.chunk_tokens * args.kv_heads * args.head_dim * 2
    metadata_ratio = meta / (args.ranks * s)

    table = Table(
        width=190, title=f"sidecar vs bare codec ({args.ranks} ranks, shard {s / 2**20:.1f} MiB, {machine()})"
    )
    for col in (
        "code",
        "commit->parity GB/s",
        "encode_gather GB/s",
        "ratio",
        "vs +checksums",
        "ceiling",
        "per-chunk RPCs: ratio",
        "Rebuild RPC GB/s",
        "reconstruct GB/s",
        "ratio",
        "+gather/scatter GB/s",
        "ratio",
        "parity/KV",
    ):
        table.add_column(col)
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['service_encode_GBps']:.2f}",
            f"{r['codec_encode_gather_GBps']:.2f}",
            f"{r['encode_ratio']:.2f} ({r['encode_ratio_median']:.2f})",
            f"{r['encode_ratio_vs_checksummed_median']:.2f}",
            f"{r['checksum_ceiling_median']:.2f}",
            f"{r['encode_ratio_per_chunk_rpc_median']:.2f}",
            f"{r['service_rebuild_GBps']:.2f}",
            f"{r['codec_reconstruct_GBps']:.2f}",
            f"{r['rebuild_ratio_vs_reconstruct']:.2f}",
            f"{r['codec_reconstruct_gather_scatter_GBps']:.2f}",
            f"{r['rebuild_ratio_vs_reconstruct_gather_scatter']:.2f} "
            f"({r['rebuild_ratio_vs_reconstruct_gather_scatter_median']:.2f})",
            f"{r['parity_bytes_per_kv_byte']:.3f} (M/N {r['expected_parity_per_kv_byte']:.3f})",
        )
    console.print(table)
    console.print(
        "ratio = bare time / service time (>= 0.8 is the goal); best-of-repeats (median of per-repeat "
        "pairs); commit->parity: one CommitChunks call per rank; per-chunk RPCs: one CommitChunk per chunk; "
        "vs +checksums: bare encode_gather that also hashes each shard (the same output as the service) / "
        "service; ceiling: bare / bare with checksums, what hashing alone leaves (medians)"
    )
    console.print(f"ledger metadata: {meta:.0f} B per chunk = {100 * metadata_ratio:.4f}% of the chunk's KV")
    report = {
        "benchmark": "sidecar",
        "backend": "cpu",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": benchlib.machine(),
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "grpcio": grpc.__version__,
        },
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "metadata_bytes_per_chunk": meta,
        "metadata_per_kv_byte": metadata_ratio,
        "codes": results,
    }
    benchlib.write_report(args.out, report)
    console.print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
