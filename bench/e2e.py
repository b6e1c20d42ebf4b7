"""End-to-end benchmark of the reference engine against a real sidecar (all ratios measured in one run).

1. Checkpoint overhead: prefill and decode throughput with protection on (xor) vs off (no commits),
   runs interleaved off/on/off/on..., ratio of medians.
2. Recovery of one lost rank (device fault mid-decode) at several context lengths: hybrid restore
   (rebuild ‖ recompute head, then the unprotected tail) vs recomputing the request from scratch on the
   same ranks right after, vs the `replicate` baseline (full host copies) restoring the same request.
3. Host memory: parity bytes held vs the KV bytes they protect, per code (expected M/N).

Every figure is the median of >= 3 samples (runs repeated in the same process), printed with its spread
(min-max); the JSON keeps every sample and the 1-minute load average before and after the run.

Writes bench/results/e2e-<machine>.json (`--quick`, a few minutes, small contexts: e2e-quick-<machine>.json).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import pathlib
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import benchlib
import torch
from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import config, engine, harness, workload
from ghostserve.kernels import protection
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = pathlib.Path(__file__).resolve().parent.parent
SMALL = config.ModelConfig()
DEMO = config.ModelConfig(vocab=1024, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, ffn=512)


def machine() -> str:
    return str(benchlib.machine()["slug"])


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the samples themselves."""
    med = statistics.median(values)
    return {"median": med, "min": min(values), "max": max(values), "samples": list(values)}


def _fmt(d: dict[str, Any], unit: str = "", digits: int = 2) -> str:
    lo, hi = f"{d['min']:.{digits}f}", f"{d['max']:.{digits}f}"
    return f"{d['median']:.{digits}f}{unit} [{lo} .. {hi}] n={len(d['samples'])}"


def recovery_samples(samples: int, **kw: Any) -> dict[str, Any]:
    """``recovery_at`` repeated ``samples`` times; the headline figures as spreads."""
    runs = [recovery_at(sample=i, **kw) for i in range(samples)]
    out: dict[str, Any] = {"context_tokens": runs[0]["context_tokens"], "runs": runs}
    for key in ("speedup_restore_vs_scratch", "speedup_with_restart", "xor_vs_replicate_restore"):
        out[key] = spread([r[key] for r in runs])
    out["xor_restore_s"] = spread([r["xor"]["restore_s"] for r in runs])
    out["replicate_restore_s"] = spread([r["replicate"]["restore_s"] for r in runs])
    out["scratch_recompute_s"] = spread([r["scratch_recompute_s"] for r in runs])
    return out


def _opts(tp: int, code: str, chunk: int, tokens: int, **kw: Any) -> engine.Options:
    slots = (math.ceil(tokens / chunk) + 2) * chunk
    return engine.Options(tp=tp, code=code, chunk_tokens=chunk, page_size=chunk, pool_slots=slots, **kw)


def overhead(
    sc: sidecar_process.SidecarProcess,
    work: pathlib.Path,
    *,
    cfg: config.ModelConfig,
    tp: int,
    chunk: int,
    requests: int,
    prompt: int,
    new: int,
    reps: int,
    rate_per_s: float,
    progress: Progress,
) -> dict[str, Any]:
    """Throughput with protection off vs on, interleaved so drift on a shared machine hits both."""
    reqs = workload.make_requests(requests, prompt_tokens=prompt, new_tokens=new, vocab=cfg.vocab, seed=1)
    # Poisson arrivals: prefill and decode of different requests mix in the same steps.
    poisson = workload.make_requests(
        requests, prompt_tokens=prompt, new_tokens=new, vocab=cfg.vocab, seed=4, rate_per_s=rate_per_s
    )
    rates: dict[bool, dict[str, list[float]]] = {
        False: {"prefill": [], "decode": [], "poisson": []},
        True: {"prefill": [], "decode": [], "poisson": []},
    }
    task = progress.add_task("overhead: protection off/on", total=2 * reps)
    for rep in range(reps):
        for protect in (False, True) if rep % 2 == 0 else (True, False):
            opts = _opts(tp, "xor", chunk, requests * (prompt + new), protect=protect)
            res = harness.run(
                cfg,
                opts,
                reqs,
                sidecar=sc,
                group=f"ovh-{rep}-{int(protect)}",
                workdir=work / f"ovh-{rep}-{int(protect)}",
            )
            c = res.counters
            rates[protect]["prefill"].append(c.prefill_tokens / c.prefill_seconds)
            rates[protect]["decode"].append(c.decode_tokens / c.decode_seconds)
            res = harness.run(
                cfg,
                opts,
                poisson,
                sidecar=sc,
                group=f"ovp-{rep}-{int(protect)}",
                workdir=work / f"ovp-{rep}-{int(protect)}",
            )
            # Busy time only (steps), so idle gaps between arrivals do not dilute the comparison.
            rates[protect]["poisson"].append(res.counters.step_tokens / res.counters.step_seconds)
            progress.advance(task)
    out: dict[str, Any] = {
        "requests": requests,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "reps": reps,
        "poisson_rate_per_s": rate_per_s,
    }
    for phase in ("prefill", "decode", "poisson"):
        off, on = statistics.median(rates[False][phase]), statistics.median(rates[True][phase])
        out[phase] = {
            "tokens_per_s_off": off,
            "tokens_per_s_on": on,
            "overhead": 1 - on / off,
            # Per interleaved pair (off and on run back to back), so drift between reps cancels.
            "overhead_pairs": spread(
                [1 - a / b for a, b in zip(rates[True][phase], rates[False][phase], strict=True)]
            ),
            "samples_off": rates[False][phase],
            "samples_on": rates[True][phase],
        }
    return out


def held_bytes(eng: engine.ReferenceEngine, *, tp: int, chunk: int) -> tuple[float, float]:
    """(parity bytes the sidecar holds, KV bytes they protect) for the engine's group, once the
    encoding queued so far has drained."""
    eng.client.flush(eng.group, wait=120.0)
    desc = eng.client.describe_group(group=eng.group)
    protected = sum(r.chunks_protected for r in desc.requests)
    return desc.parity_bytes, protected * tp * eng.shape.shard_nbytes(chunk)


def recovery_at(
    sc: sidecar_process.SidecarProcess,
    work: pathlib.Path,
    *,
    cfg: config.ModelConfig,
    tp: int,
    chunk: int,
    tokens: int,
    new: int,
    progress: Progress,
    sample: int = 0,
) -> dict[str, Any]:
    """One request of ``tokens`` prompt tokens; rank 1 lost mid-decode; xor hybrid vs scratch vs replicate."""
    [req] = workload.make_requests(1, prompt_tokens=tokens, new_tokens=new, vocab=cfg.vocab, seed=2, jitter=0)
    at = math.ceil(tokens / chunk) + new // 2
    out: dict[str, Any] = {"context_tokens": tokens, "fault_at_step": at}
    for code in ("xor", "replicate"):
        task = progress.add_task(f"{tokens} tokens, {code} #{sample + 1}", total=new)
        measured: dict[str, float] = {}

        def hook(
            eng: engine.ReferenceEngine,
            code: str = code,
            measured: dict[str, float] = measured,
            task: Any = task,
        ) -> None:
            progress.update(task, completed=sum(len(r.output) for r in eng.requests.values()))
            if eng.counters.steps == at - 1 and "parity_bytes" not in measured:
                measured["parity_bytes"], measured["kv_bytes_protected"] = held_bytes(eng, tp=tp, chunk=chunk)
            if code == "xor" and eng.recoveries and "scratch_s" not in measured:
                ranges = {r.request_id: [(0, r.kv_len)] for r in eng.requests.values() if r.kv_len}
                t0 = time.perf_counter()
                eng.replay(ranges)
                measured["scratch_s"] = time.perf_counter() - t0

        res = harness.run(
            cfg,
            _opts(tp, code, chunk, tokens + new),
            [req],
            sidecar=sc,
            group=f"rec-{tokens}-{code}-{sample}",
            workdir=work / f"rec-{tokens}-{code}-{sample}",
            faults=[engine.Fault(at, "device", (1,))],
            on_step=hook,
        )
        progress.update(task, completed=new)
        [rec] = res.recoveries
        out[code] = {
            "restore_s": rec.restore_s,
            "restart_s": rec.restart_s,
            "total_s": rec.total_s,
            "rebuild_s": rec.rebuild_s,
            "head_recompute_s": rec.head_s,
            "after_recompute_s": rec.after_s,
            "bytes_rebuilt": rec.bytes_rebuilt,
            "chunks_rebuilt": rec.chunks_rebuilt,
            "chunks_recomputed": rec.chunks_recomputed,
            "tokens_recomputed": rec.tokens_recomputed,
            "plan_r": rec.plan,
            "parity_bytes": measured.get("parity_bytes"),
            "kv_bytes_protected": measured.get("kv_bytes_protected"),
            "prefill_tokens_per_s": res.counters.prefill_tokens / max(res.counters.prefill_seconds, 1e-9),
        }
        if code == "xor":
            out["scratch_recompute_s"] = measured["scratch_s"]
    out["speedup_restore_vs_scratch"] = out["scratch_recompute_s"] / out["xor"]["restore_s"]
    out["speedup_with_restart"] = (out["xor"]["restart_s"] + out["scratch_recompute_s"]) / out["xor"][
        "total_s"
    ]
    out["xor_vs_replicate_restore"] = out["replicate"]["restore_s"] / out["xor"]["restore_s"]
    return out


def memory(
    sc: sidecar_process.SidecarProcess,
    work: pathlib.Path,
    *,
    cfg: config.ModelConfig,
    tp: int,
    chunk: int,
    tokens: int,
    progress: Progress,
) -> list[dict[str, Any]]:
    """Parity bytes held / KV bytes protected for each code, after encoding drained."""
    rows = []
    reqs = workload.make_requests(2, prompt_tokens=tokens, new_tokens=4, vocab=cfg.vocab, seed=3, jitter=0)
    task = progress.add_task("host memory per code", total=4)
    for code in ("xor", "rdp", "rs", "replicate"):
        m = protection.Protection(code).stored_shards(tp)  # S-byte shards held per chunk
        seen: dict[str, float] = {}

        def hook(eng: engine.ReferenceEngine, seen: dict[str, float] = seen) -> None:
            if "parity" in seen or eng.counters.steps < math.ceil(tokens / chunk):
                return
            seen["parity"], seen["kv"] = held_bytes(eng, tp=tp, chunk=chunk)

        harness.run(
            cfg,
            _opts(tp, code, chunk, 2 * (tokens + 4)),
            reqs,
            sidecar=sc,
            group=f"mem-{code}",
            workdir=work / f"mem-{code}",
            on_step=hook,
        )
        rows.append(
            {
                "code": code,
                "parity_bytes": seen["parity"],
                "kv_bytes": seen["kv"],
                "ratio": seen["parity"] / seen["kv"],
                "expected_m_over_n": m / tp,
            }
        )
        progress.advance(task)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small contexts, a few minutes")
    p.add_argument("--samples", type=int, default=3, help="repetitions of every measurement (>= 3)")
    p.add_argument("--tp", type=int, default=4)
    p.add_argument("--lengths", type=int, nargs="*", help="context lengths for the recovery comparison")
    p.add_argument("--out", type=pathlib.Path, help="default: bench/results/e2e[-quick]-<machine>.json")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.samples < 3:
        p.error("--samples must be >= 3 (a median and a spread need at least 3)")
    load_before = os.getloadavg()[0]
    if args.out is None:
        name = f"e2e-quick-{machine()}.json" if args.quick else f"e2e-{machine()}.json"
        args.out = ROOT / "bench" / "results" / name
    cfg = SMALL
    if args.quick:
        lengths, chunk, ovh = (
            args.lengths or [512, 2048],
            64,
            dict(requests=2, prompt=256, new=16, reps=args.samples, rate_per_s=4.0),
        )
    else:
        lengths, chunk, ovh = (
            args.lengths or [4096, 16384, 32768],
            256,
            dict(requests=6, prompt=1024, new=64, reps=args.samples, rate_per_s=0.5),
        )
    console = Console()
    work = pathlib.Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    sc = sidecar_process.SidecarProcess(work / "sidecar", budget="4GiB")
    t0 = time.perf_counter()
    try:
        sc.start()
        with Progress(console=console) as progress:
            ovh_res = overhead(sc, work, cfg=cfg, tp=args.tp, chunk=chunk, progress=progress, **ovh)
            rec_res = [
                recovery_samples(
                    args.samples,
                    sc=sc,
                    work=work,
                    cfg=cfg,
                    tp=args.tp,
                    chunk=chunk,
                    tokens=n,
                    new=32 if args.quick else 64,
                    progress=progress,
                )
                for n in lengths
            ]
            mem_res = memory(sc, work, cfg=cfg, tp=args.tp, chunk=chunk, tokens=lengths[0], progress=progress)
    finally:
        sc.stop()
        shutil.rmtree(work, ignore_errors=True)
    t = Table(
        title=f"GhostServe end to end (reference engine, TP={args.tp}, T={chunk}, {machine()}, shared CPU)"
    )
    t.add_column("measure")
    t.add_column("value", justify="right")
    for phase in ("prefill", "decode", "poisson"):
        r = ovh_res[phase]
        pairs = {k: 100 * v for k, v in r["overhead_pairs"].items() if k != "samples"}
        t.add_row(
            f"{phase} throughput on/off (overhead, per pair)",
            f"{r['tokens_per_s_on']:.0f}/{r['tokens_per_s_off']:.0f} tok/s "
            f"overhead {_fmt({**pairs, 'samples': r['overhead_pairs']['samples']}, '%', 1)}",
        )
    for r in rec_res:
        n = r["context_tokens"]
        t.add_row(f"{n} tokens: restore (xor)", _fmt(r["xor_restore_s"], " s"))
        t.add_row(f"{n} tokens: recompute from scratch", _fmt(r["scratch_recompute_s"], " s"))
        t.add_row(f"{n} tokens: restore (replicate)", _fmt(r["replicate_restore_s"], " s"))
        t.add_row(f"{n} tokens: speed-up vs scratch", _fmt(r["speedup_restore_vs_scratch"], "x", 1))
        t.add_row(f"{n} tokens: speed-up incl. restart", _fmt(r["speedup_with_restart"], "x", 1))
    for m in mem_res:
        t.add_row(
            f"host memory {m['code']}: parity/KV", f"{m['ratio']:.3f} (M/N = {m['expected_m_over_n']:.3f})"
        )
    load_after = os.getloadavg()[0]
    t.add_row("load average (1 min) before / after", f"{load_before:.2f} / {load_after:.2f}")
    console.print(t)
    report = {
        "benchmark": "e2e",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "seconds": time.perf_counter() - t0,
        "machine": benchlib.machine(),
        "samples": args.samples,
        "load_average_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "model": cfg.__dict__,
        "tp": args.tp,
        "chunk_tokens": chunk,
        "overhead": ovh_res,
        "recovery": rec_res,
        "host_memory": mem_res,
    }
    return benchlib.save(args.out, report, console.print)


if __name__ == "__main__":
    sys.exit(main())
