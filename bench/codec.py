"""Codec throughput as ratios to baselines measured side by side on the same buffers in the same run.

CPU cases (default): xor N=8, rdp N=4, rs N=4 M=2 over 256 MiB of data (`--quick`: 32 MiB), encode and
reconstruct (the first M data shards lost). GPU cases (`--backend cuda`, needs cupy and a GPU): 2/4/8/16 GB
where memory allows, vs a device-to-device copy and vs the torch backend.

Every ratio is normalised by the bytes each side moves (S = bytes per shard, N data, M parity, L = M lost):
  encode, every coder (ours, numpy, torch, ISA-L, zfec)  reads N*S, writes M*S   -> (N+M)*S  (xor: (N+1)*S)
  reconstruct, every coder                               reads N*S, writes L*S   -> (N+L)*S
  memcpy / device copy of the N data shards              reads N*S, writes N*S   -> 2N*S
so ratio = (ours' bytes / ours' seconds) / (baseline's bytes / baseline's seconds): how much faster we move
bytes, not how much sooner one call returns (xor N=8 encode moves 9*S against memcpy's 16*S).

Contenders. ours: the `cpu` backend. Where libisal is installed it calls ISA-L itself for xor (xor_gen)
and for rs (ec_encode_data), so for xor and rs "ours vs ISA-L" is our wrapper against the library it
wraps (summary key `..._vs_isal_it_wraps`: 1.0 = no overhead), not a competitor. For rdp the ISA-L
contender is RS(N, 2) (ISA-L has no RDP): a real comparison (`..._vs_isal_rs`). numpy: the `numpy`
backend, no ISA-L (`..._numpy_vs_isal` is a real comparison). torch: the torch backend. zfec: RS in C.

Timing. Each round runs every contender once, back to back (after one warm-up run each); every ratio is
computed within a round and reported as the median and range over >= 3 rounds. CPU cases: every
contender runs on one thread (torch is pinned to 1; NumPy, ISA-L and zfec are single-threaded) and is
timed in process CPU seconds (time.process_time), which time spent descheduled by other jobs on a shared
machine does not inflate. GPU cases: wall seconds with a device synchronise. The load average is
recorded before and after the run.

Writes bench/results/codec-<backend>-<machine>.json with machine info, versions, date, `summary`
(median ratios) and `spread` (median, min, max, samples of each ratio).
    python bench/codec.py [--quick] [-k N -m M --code rs --size 64MiB] [--backend cpu|cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import pathlib
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import benchlib
import ghostserve.kernels as gk
import numpy as np
from ghostserve.kernels import gf256, isal
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
MiB = 1 << 20


@dataclasses.dataclass
class Case:
    name: str  # geometry: encode_8x1x256MiB
    op: str
    code: str
    n: int
    m: int
    data_bytes: int
    samples: dict[str, list[float]]  # contender -> seconds of each round
    moved: dict[str, int]  # contender -> bytes it reads + writes per call

    def gbps(self, who: str) -> float:
        """Median GB/s of bytes moved (read + written)."""
        return self.moved[who] / statistics.median(self.samples[who]) / 1e9

    def ratios(self, ours: str, base: str) -> list[float] | None:
        """Per round: (ours' bytes / ours' seconds) / (base's bytes / base's seconds)."""
        if ours not in self.samples or base not in self.samples:
            return None
        scale = self.moved[ours] / self.moved[base]
        return [
            tb / to * scale for to, tb in zip(self.samples[ours], self.samples[base], strict=True)
        ]


def moved_bytes(op: str, n: int, m: int, shard: int) -> tuple[int, int]:
    """(bytes a coder moves, bytes a copy of the data moves) per call; see the module docstring."""
    coder = (n + m) * shard  # encode writes M parity shards; reconstruct writes the L = M lost ones
    return coder, 2 * n * shard


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)\s*(|B|KiB|MiB|GiB|GB|MB)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 256MiB, 2GB")
    unit = {"": 1, "B": 1, "KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30, "MB": 10**6, "GB": 10**9}[m.group(2)]
    return int(m.group(1)) * unit


def size_label(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", 1 << 10)):
        if nbytes % scale == 0:
            return f"{nbytes // scale}{unit}"
    return f"{nbytes}B"


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """ISA-L's xor_gen needs 32-byte aligned buffers; 64 also keeps cache lines whole."""
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes]


def interleaved_samples(
    fns: dict[str, Callable[[], None]], rounds: int, *, clock: Callable[[], float] = time.perf_counter
) -> dict[str, list[float]]:
    """Seconds of every contender in each of `rounds` rounds (one run each per round, back to back,
    after a warm-up): a ratio taken within a round compares runs that shared the machine's state."""
    if rounds < 3:
        raise ValueError(f"need at least 3 rounds for a median and spread, got {rounds}")
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = clock()
            fn()
            samples[name].append(clock() - start)
    return samples


def machine() -> dict[str, Any]:
    return benchlib.machine()


def versions() -> dict[str, str]:
    out = {"numpy": np.__version__}
    for name in ("torch", "zfec", "cupy"):
        try:
            out[name] = str(__import__(name).__version__)
        except Exception:  # not installed here: simply not part of this run
            continue
    out["isal"] = "libisal.so.2 (ctypes)" if isal.load() is not None else "not installed"
    return out


def cpu_case(code: str, n: int, m: int, data_bytes: int, op: str, rounds: int) -> Case:
    size = data_bytes // n // 64 * 64
    rng = np.random.default_rng(0)
    data = [aligned_empty(size) for _ in range(n)]
    for d in data:
        d[:] = rng.integers(0, 256, size, dtype=np.uint8)
    parity = [aligned_empty(size) for _ in range(m)]
    gk.Codec(code, n, m, backend="numpy").encode(data, parity)
    copies = [aligned_empty(size) for _ in range(n)]
    lost = list(range(min(m, n)))
    full = [*data, *parity]
    survivors = [None if i in lost else s for i, s in enumerate(full)]
    outs = {i: aligned_empty(size) for i in lost}
    scratch = [aligned_empty(size) for _ in range(m)]
    fns: dict[str, Callable[[], None]] = {}

    def ours(backend: str) -> Callable[[], None]:
        c = gk.Codec(code, n, m, backend=backend)
        if op == "encode":
            return lambda: c.encode(data, scratch)
        return lambda: c.reconstruct(survivors, out=outs)

    fns["ours"] = ours("cpu")
    if isal.load() is not None:
        fns["numpy"] = ours("numpy")
    try:
        import torch

        torch.set_num_threads(1)  # every contender on one thread: CPU seconds then compare like for like
        tdata = [torch.from_numpy(d) for d in data]
        tsurv = [None if s is None else torch.from_numpy(s) for s in survivors]
        touts = {i: torch.from_numpy(o) for i, o in outs.items()}
        tscr = [torch.from_numpy(s) for s in scratch]
        tc = gk.Codec(code, n, m, backend="torch")
        fns["torch"] = (
            (lambda: tc.encode(tdata, tscr)) if op == "encode" else (lambda: tc.reconstruct(tsurv, out=touts))
        )
    except ImportError:
        pass

    def memcpy() -> None:
        for src, dst in zip(data, copies, strict=True):
            np.copyto(dst, src)

    fns["memcpy"] = memcpy
    lib = isal.load()
    if lib is not None:
        if code == "xor" and op == "encode":
            fns["isal"] = lambda: lib.xor_gen(data, scratch[0])
        elif code == "xor":
            fns["isal"] = lambda: lib.xor_gen([s for s in survivors if s is not None], outs[0])
        else:
            # rdp has no ISA-L counterpart: RS(N, 2) gives the same protection.
            if op == "encode":
                matrix = gf256.cauchy_parity(n, m)
                fns["isal"] = lambda: lib.encode(matrix, data, scratch)
            else:
                alive = tuple(i for i in range(n + m) if i not in lost)[:n]
                dec = gf256.decode_matrix(n, m, alive, tuple(lost))
                rs_parity = [aligned_empty(size) for _ in range(m)]
                lib.encode(gf256.cauchy_parity(n, m), data, rs_parity)
                rs_full = [*data, *rs_parity]
                fns["isal"] = lambda: lib.encode(dec, [rs_full[i] for i in alive], [outs[i] for i in lost])
    try:
        import zfec

        zm = n + m
        if op == "encode":
            enc = zfec.Encoder(n, zm)
            ztuple = tuple(data)
            wanted = tuple(range(n, zm))
            fns["zfec"] = lambda: enc.encode(ztuple, wanted) and None
        else:
            dec_z = zfec.Decoder(n, zm)
            zpar = zfec.Encoder(n, zm).encode(tuple(data), tuple(range(n, zm)))
            alive_z = [i for i in range(zm) if i not in lost][:n]
            zblocks = [data[i] if i < n else zpar[i - n] for i in alive_z]
            # zfec's decode reorders the lists it is given: hand it fresh tuples every call.
            fns["zfec"] = lambda: dec_z.decode(tuple(zblocks), tuple(alive_z)) and None
    except ImportError:
        pass
    samples = interleaved_samples(fns, rounds, clock=time.process_time)
    coder, copy = moved_bytes(op, n, m, size)
    moved = {who: copy if who == "memcpy" else coder for who in samples}
    return Case(f"{op}_{n}x{m}x{size_label(size * n)}", op, code, n, m, size * n, samples, moved)


def cpu_summary(cases: Sequence[Case]) -> dict[str, dict[str, Any]]:
    """Ratio name -> spread of its per-round values (median, min, max, samples)."""
    out: dict[str, dict[str, Any]] = {}
    for c in cases:
        tag = f"{c.code}{c.n}" + (f"x{c.m}" if c.code == "rs" else "") + f"_{c.op}"
        isal = "isal_rs" if c.code == "rdp" else "isal_it_wraps"
        pairs = [("ours", "memcpy", "vs_memcpy"), ("ours", "isal", f"vs_{isal}"), ("ours", "zfec", "vs_zfec"),
                 ("ours", "torch", "vs_torch"), ("numpy", "isal", "numpy_vs_isal"),
                 ("numpy", "memcpy", "numpy_vs_memcpy")]  # fmt: skip
        for ours, base, label in pairs:
            r = c.ratios(ours, base)
            if r is not None:
                out[f"{tag}_{label}"] = benchlib.spread(r)
    return out


def gpu_case(code: str, n: int, m: int, size: int, op: str, rounds: int) -> Case:
    import cupy

    data = [cupy.random.randint(0, 256, size, dtype=cupy.uint8) for _ in range(n)]
    parity = [cupy.empty(size, cupy.uint8) for _ in range(m)]
    ours = gk.Codec(code, n, m, backend="cuda")
    ours.encode(data, parity)
    lost = list(range(min(m, n)))
    survivors = [None if i in lost else s for i, s in enumerate([*data, *parity])]
    outs = {i: cupy.empty(size, cupy.uint8) for i in lost}
    copy_dst = cupy.empty(size, cupy.uint8)
    sync = cupy.cuda.Device().synchronize

    def run_ours() -> None:
        if op == "encode":
            ours.encode(data, parity)
        else:
            ours.reconstruct(survivors, out=outs)
        sync()

    def run_copy() -> None:
        for d in data:  # every data byte read once and written once
            copy_dst[...] = d
        sync()

    fns: dict[str, Callable[[], None]] = {"ours": run_ours, "copy": run_copy}
    try:
        import torch

        tc = gk.Codec(code, n, m, backend="torch")
        td = [torch.from_dlpack(d) for d in data]
        tp = [torch.from_dlpack(p) for p in parity]
        tsurv = [None if s is None else torch.from_dlpack(s) for s in survivors]
        touts = {i: torch.from_dlpack(o) for i, o in outs.items()}

        def run_torch() -> None:
            if op == "encode":
                tc.encode(td, tp)
            else:
                tc.reconstruct(tsurv, out=touts)
            torch.cuda.synchronize()

        fns["torch"] = run_torch
    except ImportError:
        pass
    samples = interleaved_samples(fns, rounds)
    coder, copy = moved_bytes(op, n, m, size)
    moved = {who: copy if who == "copy" else coder for who in samples}
    return Case(f"{op}_{n}x{m}x{size_label(size * n)}", op, code, n, m, size * n, samples, moved)


def gpu_cases(args: argparse.Namespace, rounds: int, progress: Progress) -> list[Case]:
    import cupy

    cases: list[Case] = []
    if args.code is None:
        geometries = [("xor", 8, 1), ("rs", 4, 2), ("rdp", 4, 2)]
    else:
        geometries = [
            (args.code, args.k, gk.Codec(args.code, args.k, args.m if args.code == "rs" else None).n_parity)
        ]
    if args.size:
        sizes = [args.size]
    else:
        sizes = [2 * 10**9] if args.quick else [2 * 10**9, 4 * 10**9, 8 * 10**9, 16 * 10**9]
    task = progress.add_task("gpu cases", total=len(geometries) * len(sizes) * 2)
    for code, n, m in geometries:
        for total in sizes:
            size = total // n // 256 * 256
            for op in ("encode", "reconstruct"):
                cupy.get_default_memory_pool().free_all_blocks()
                free, _ = cupy.cuda.runtime.memGetInfo()
                # data + parity + outputs + copy target, plus the torch backend's int64 chunk temporaries
                if (n + 2 * m + 1) * size + (1 << 30) < free:
                    progress.update(task, description=f"{op} {code}({n},{m}) {size_label(size * n)}")
                    cases.append(gpu_case(code, n, m, size, op, rounds))
                progress.advance(task)
    return cases


def gpu_summary(cases: Sequence[Case]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for c in cases:
        tag = f"{c.code}{c.n}x{c.m}_{c.op}_{size_label(c.data_bytes)}"
        for base, label in (("copy", "vs_copy_bandwidth"), ("torch", "vs_torch")):
            r = c.ratios("ours", base)
            if r is not None:
                out[f"{tag}_{label}"] = benchlib.spread(r)
    return out


def parse(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sizes, fewer rounds (< 60 s on a CPU)")
    p.add_argument("--backend", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--code", choices=["xor", "rdp", "rs"], help="one geometry instead of the standard three")
    p.add_argument("-k", type=int, default=4, help="data shards N with --code")
    p.add_argument("-m", type=int, default=2, help="parity shards M with --code (rs)")
    p.add_argument("--size", type=parse_size, help="data bytes per case, e.g. 256MiB (GPU: 2GB)")
    p.add_argument("--rounds", type=int, help="timed rounds per contender")
    p.add_argument(
        "--out", type=pathlib.Path, help="JSON path (default bench/results/codec-<backend>-<machine>.json)"
    )
    return p.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    console = Console()
    rounds = args.rounds or (3 if args.quick else 5)
    info = machine()
    load_before = benchlib.load_average()
    if args.backend == "cuda":
        import cupy

        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        info["gpu"] = gpu
        info["gpu_memory_bytes"] = int(props["totalGlobalMem"])
        info["slug"] = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")[:40]
    with Progress(console=console, transient=True) as progress:
        if args.backend == "cuda":
            cases = gpu_cases(args, rounds, progress)
            summary = gpu_summary(cases)
        else:
            total = args.size or (32 * MiB if args.quick else 256 * MiB)
            if args.code is None:
                geometries = [("xor", 8, 1), ("rdp", 4, 2), ("rs", 4, 2)]
            else:
                geometries = [
                    (
                        args.code,
                        args.k,
                        gk.Codec(args.code, args.k, args.m if args.code == "rs" else None).n_parity,
                    )
                ]
            task = progress.add_task("cpu cases", total=2 * len(geometries))
            cases = []
            for code, n, m in geometries:
                for op in ("encode", "reconstruct"):
                    progress.update(task, description=f"{op} {code}({n},{m})")
                    cases.append(cpu_case(code, n, m, total, op, rounds))
                    progress.advance(task)
            summary = cpu_summary(cases)
    load_after = benchlib.load_average()
    table = Table(
        title=f"codec: GB/s of bytes moved (read + written), median of {rounds} rounds, per "
        f"{'CPU' if args.backend == 'cpu' else 'wall'} second ({info['cpu']}, {info['cores']} cores, shared)"
    )
    contenders = sorted({k for c in cases for k in c.samples})
    labels = {"isal": "isal (ours calls it for xor/rs)"} if args.backend == "cpu" else {}
    table.add_column("case")
    for who in contenders:
        table.add_column(labels.get(who, who), justify="right")
    for c in cases:
        table.add_row(
            c.name + f" ({c.code})", *(f"{c.gbps(w):.2f}" if w in c.samples else "-" for w in contenders)
        )
    console.print(table)
    console.print(
        f"ratios by bytes moved, median [min .. max] of {rounds} rounds (higher: ours faster)", markup=False
    )
    for key, stats in summary.items():
        console.print(f"  {key:<40} {stats['median']:.3f}  [{stats['min']:.3f} .. {stats['max']:.3f}]")
    console.print(f"load average before {load_before}, after {load_after} ({info['cores']} cores)")
    result = {
        "benchmark": "codec",
        "backend": args.backend,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": info,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "versions": versions(),
        "ours_backend": gk.Codec("rs", 4, 2).backend if args.backend == "cpu" else "cuda",
        "quick": args.quick,
        "rounds": rounds,
        "notes": "ratio = (bytes ours moves / our seconds) / (bytes the baseline moves / its seconds), "
        "computed per round with the contenders run back to back; summary = median over rounds, spread = "
        "median/min/max/samples. Bytes moved per call: coders (N+M)*S on encode, (N+L)*S on reconstruct; "
        "memcpy/copy 2N*S. For xor and rs the ISA-L contender is the library ours calls (vs_isal_it_wraps "
        "measures our wrapper's overhead); for rdp it is ISA-L RS(N,2). The machine was shared with other "
        "jobs: see the load averages. "
        + (
            "CPU cases: every contender single-threaded (torch pinned to 1 thread), timed in process CPU "
            "seconds (time.process_time)."
            if args.backend == "cpu"
            else "GPU cases time wall seconds with a device synchronise."
        ),
        "cases": [
            {
                "name": c.name,
                "code": c.code,
                "op": c.op,
                "n": c.n,
                "m": c.m,
                "data_bytes": c.data_bytes,
                "bytes_moved": c.moved,
                "seconds": c.samples,
                "gbps_moved_median": {w: round(c.gbps(w), 3) for w in c.samples},
            }
            for c in cases
        ],
        "summary": {key: stats["median"] for key, stats in summary.items()},
        "spread": summary,
    }
    out = args.out or RESULTS / f"codec-{args.backend}-{info['slug']}.json"
    return benchlib.save(out, result, console.print)


if __name__ == "__main__":
    sys.exit(main())
