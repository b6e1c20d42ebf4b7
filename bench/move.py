"""KV move benchmark: two real sidecar processes on loopback TCP, measured side by side in one run.

  throughput:        MoveGroup of a group (every rank's pool + ledger) source -> target, vs a raw loopback
                     TCP copy of the same pool bytes (the bench process sends the mapped pools with
                     sendall, a receiver process recv_into's them into one buffer and acks). Both sides
                     move the same pool bytes; the ratio is raw seconds / move seconds (= move GB/s over
                     raw GB/s). Goal >= 0.8.
  move+rebuild:      after a device fault (MarkLost of one rank) the source rebuilds the lost rank from
                     parity and moves the group to the target, vs recomputing the same tokens: the
                     reference engine's tiny model prefilling that many tokens (chunked prefill, tp=1:
                     the work of every rank, wall time). Both produce the KV of the same tokens; seconds
                     per MiB of KV and the ratio recompute / (rebuild + move) are reported per length.

Every figure is the median of --repeat (>= 3) samples, with min/max. Wall time on both sides.
usage: python bench/move.py [--quick] [--repeat 3] [--tokens 4096,16384,32768] [--pool-mib 64]
Writes bench/results/move-<machine>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import benchlib
import numpy as np
from ghostserve.sidecar import client, pools
from ghostserve.v1 import sidecar_pb2 as pb
from rich.progress import Progress

REPO = pathlib.Path(__file__).resolve().parents[1]
RECEIVER = """
import socket, sys
n = int(sys.argv[1]); srv = socket.create_server(("127.0.0.1", 0)); print(srv.getsockname()[1], flush=True)
buf = bytearray(n); view = memoryview(buf)
while True:
    conn, _ = srv.accept()
    got = 0
    while got < n:
        k = conn.recv_into(view[got:], min(n - got, 1 << 22))
        if not k: break
        got += k
    conn.sendall(b"k"); conn.close()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def sidecar(name: str, prefix: str, workdir: pathlib.Path) -> Iterator[str]:
    address = f"127.0.0.1:{free_port()}"
    # Plain TCP on loopback only (--insecure: every caller is trusted as the operator).
    cmd = [sys.executable, "-m", "ghostserve.cli.main", "sidecar", "--listen", address, "--insecure"]
    cmd += ["--budget", "8GiB", "--shm-prefix", prefix, "--node", name, "--grace", "2"]
    with open(workdir / f"{name}.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        with client.SidecarClient(address, timeout=2) as c:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(Exception):
                    if c.health() == 1:
                        break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"sidecar {name} did not start: {(workdir / f'{name}.log').read_text()}")
                time.sleep(0.1)
        yield address
    finally:
        proc.terminate()
        proc.wait(30)


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": samples,
    }


def fill(c: client.SidecarClient, group: str, layout: pb.KVLayout, chunk: int, *, world: int = 2) -> int:
    """Attach every rank, write random KV, commit every chunk of one request, wait for parity."""
    rng = np.random.default_rng(1)
    prot = pb.Protection(code=pb.XOR, parity_shards=1, chunk_tokens=chunk)
    for rank in range(world):
        reply = c.attach(group=group, rank=rank, world_size=world, layout=layout, protection=prot)
        mm, pool = pools.map_pool(reply.pool)
        pool[:] = rng.integers(0, 256, pool.size, dtype=np.uint8)
        del pool
        mm.close()
    tokens = layout.pool_slots
    for idx in range(tokens // chunk):
        slots = list(range(idx * chunk, (idx + 1) * chunk))
        for rank in range(world):
            c.commit_chunk(group=group, rank=rank, request_id="r", chunk_index=idx, slots=slots)
    for rank in range(world):
        c.detach(group=group, rank=rank)
    assert c.flush(group, wait=600).drained
    return sum(r.pool.nbytes for r in c.describe_group(group=group).ranks)


def raw_copy(c: client.SidecarClient, group: str, nbytes: int) -> float:
    """Seconds to send the group's pools over loopback TCP to a receiver process and get its ack."""
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, str(nbytes)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        maps = [pools.map_pool(r.pool) for r in c.describe_group(group=group).ranks]
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            for _, pool in maps:
                s.sendall(pool.data)
            assert s.recv(1) == b"k"
        seconds = time.perf_counter() - t0
        maps.clear()  # unmapped once the views are gone
        return seconds
    finally:
        proc.kill()
        proc.wait()


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(src: str, dst: str, pool_mib: int, repeat: int, progress: Progress) -> dict[str, Any]:
    # Rows of 512 B (4 layers x 8 heads x 64 dims... of fp16 over 2 planes) fill `pool_mib` per rank.
    slots = pool_mib * 1024 * 1024 // (2 * 4 * 8 * 64 * 2)
    layout = pb.KVLayout(layers=4, kv_heads=8, head_dim=64, dtype=pb.FLOAT16, page_size=16, pool_slots=slots)
    group = "bench/throughput"
    with client.SidecarClient(src, timeout=600) as s, client.SidecarClient(dst, timeout=600) as d:
        nbytes = fill(s, group, layout, 256)
        move_s, raw_s, ratios = [], [], []
        task = progress.add_task("throughput", total=repeat)
        for _ in range(repeat):
            with contextlib.suppress(Exception):
                d.delete_group(group=group)
            m = timed(lambda: s.move_group(group=group, target=dst))
            r = raw_copy(s, group, nbytes)
            move_s.append(m)
            raw_s.append(r)
            ratios.append(r / m)
            progress.advance(task)
        d.delete_group(group=group)
        s.delete_group(group=group)
    return {
        "pool_bytes": nbytes,
        "move_seconds": summary(move_s),
        "raw_tcp_seconds": summary(raw_s),
        "move_gb_per_s": nbytes / statistics.median(move_s) / 1e9,
        "raw_tcp_gb_per_s": nbytes / statistics.median(raw_s) / 1e9,
        "ratio_move_over_raw": summary(ratios),
        "goal": 0.8,
    }


RECOMPUTE_THREADS = 1  # what a reference rank process uses (engine.Options.threads_per_rank)


def recompute(tokens: int, chunk: int = 1024) -> float:
    """Wall seconds of the reference engine's tiny model prefilling `tokens` tokens: tp=1 (the work of
    every rank in one process), chunked prefill of `chunk` tokens, RECOMPUTE_THREADS torch threads."""
    import torch
    from ghostserve.engine.reference import config as config_mod
    from ghostserve.engine.reference import model

    torch.set_num_threads(RECOMPUTE_THREADS)
    cfg = config_mod.ModelConfig()
    w = model.build_weights(cfg, tp=1, rank=0)
    pool = torch.zeros(cfg.layers, 2, tokens, cfg.kv_heads, cfg.head_dim)
    ids = torch.randint(0, cfg.vocab, (tokens,), generator=torch.Generator().manual_seed(0))
    slots = torch.arange(tokens)
    t0 = time.perf_counter()
    with torch.no_grad():
        for start in range(0, tokens, chunk):
            piece = model.Piece(ids[start : start + chunk], start, slots[: start + chunk])
            model.forward(w, [piece], pool, model.LocalCollective())
    return time.perf_counter() - t0


def move_vs_recompute(src: str, dst: str, tokens: int, repeat: int, progress: Progress) -> dict[str, Any]:
    from ghostserve.engine.reference import config as config_mod

    cfg = config_mod.ModelConfig()
    # The tiny model's KV split over 2 ranks (tp=2), fp32 as the reference engine keeps it.
    layout = pb.KVLayout(
        layers=cfg.layers,
        kv_heads=cfg.kv_heads_per_rank(2),
        head_dim=cfg.head_dim,
        dtype=pb.FLOAT32,
        page_size=16,
        pool_slots=tokens,
    )
    group = f"bench/t{tokens}"
    with client.SidecarClient(src, timeout=600) as s, client.SidecarClient(dst, timeout=600) as d:
        kv_bytes = fill(s, group, layout, 256)
        moved, rebuilt, total, redo = [], [], [], []
        task = progress.add_task(f"{tokens} tokens", total=repeat)
        for _ in range(repeat):
            with contextlib.suppress(Exception):
                d.delete_group(group=group)
            s.mark_lost(group=group, ranks=[1], reason="bench")
            t0 = time.perf_counter()
            report = s.rebuild(group=group, lost_ranks=[1])
            t1 = time.perf_counter()
            s.move_group(group=group, target=dst)
            t2 = time.perf_counter()
            assert report.bytes_rebuilt > 0
            rebuilt.append(t1 - t0)
            moved.append(t2 - t1)
            total.append(t2 - t0)
            redo.append(recompute(tokens))
            progress.advance(task)
        d.delete_group(group=group)
        s.delete_group(group=group)
    mib = kv_bytes / (1 << 20)
    return {
        "tokens": tokens,
        "kv_bytes": kv_bytes,
        "rebuild_seconds": summary(rebuilt),
        "move_seconds": summary(moved),
        "rebuild_plus_move_seconds": summary(total),
        "recompute_seconds": summary(redo),
        "rebuild_plus_move_s_per_mib": statistics.median(total) / mib,
        "recompute_s_per_mib": statistics.median(redo) / mib,
        "ratio_recompute_over_move": summary([r / t for r, t in zip(redo, total, strict=True)]),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not a figure")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--tokens", default="4096,16384,32768")
    p.add_argument("--pool-mib", type=int, default=64, help="pool per rank for the throughput case")
    p.add_argument("--out", type=pathlib.Path)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    if args.repeat < 3:
        raise SystemExit("--repeat must be >= 3 (median and spread)")
    lengths = [512, 1024] if args.quick else [int(t) for t in args.tokens.split(",") if t]
    pool_mib = 4 if args.quick else args.pool_mib
    load_before = round(os.getloadavg()[0], 2)
    prefix = f"gs-bm{secrets.token_hex(3)}-"
    workdir = pathlib.Path(os.environ.get("TMPDIR", "/tmp"))
    report: dict[str, Any] = {
        "benchmark": "move",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": benchlib.machine(),
        "quick": args.quick,
        "repeat": args.repeat,
        "load_average_before": load_before,
        "recompute": {"threads": RECOMPUTE_THREADS, "tp": 1, "prefill_chunk_tokens": 1024},
        "raw_tcp": "the bench process sendall()s the mapped pools to a receiver process (recv_into)",
    }
    slug = report["machine"]["slug"]
    name = f"move-quick-{slug}.json" if args.quick else f"move-{slug}.json"
    path = args.out or REPO / "bench" / "results" / name

    def save(done: bool) -> None:
        # Written after every case: a long run that is stopped keeps what it measured.
        report["complete"] = done
        report["load_average_after"] = round(os.getloadavg()[0], 2)
        benchlib.write_report(path, report)

    with sidecar("src", prefix, workdir) as src, sidecar("dst", prefix, workdir) as dst, Progress() as prog:
        if not args.skip_throughput:
            report["throughput"] = throughput(src, dst, pool_mib, args.repeat, prog)
            save(False)
        report["move_vs_recompute"] = []
        for n in lengths:
            report["move_vs_recompute"].append(move_vs_recompute(src, dst, n, args.repeat, prog))
            save(False)
    save(True)
    t = report.get("throughput")
    if t:
        print(f"move {t['move_gb_per_s']:.2f} GB/s vs raw TCP {t['raw_tcp_gb_per_s']:.2f} GB/s: "
              f"ratio {t['ratio_move_over_raw']['median']:.2f} (goal 0.8)")
    for r in report["move_vs_recompute"]:
        print(f"{r['tokens']} tokens: rebuild+move {r['rebuild_plus_move_seconds']['median']:.3f} s, "
              f"recompute {r['recompute_seconds']['median']:.3f} s "
              f"(x{r['ratio_recompute_over_move']['median']:.1f})")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
