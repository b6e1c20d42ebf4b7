"""`ghostserve demo --no-cluster`: the engine alone (no operator, no pods) survives a GPU (device) fault
with its output unchanged. (`ghostserve demo` runs the whole system on the embedded cluster.)

Starts a real sidecar and the reference engine (TP ranks as processes), serves several long requests
fault-free, serves them again with a device fault injected mid-decode (a rank SIGKILLed and its pool
destroyed), recovers by rebuild + recompute, times recomputing everything from scratch in the same
run, and prints a report. Exit status 1 if any output token differs from the fault-free run.
"""

from __future__ import annotations

import argparse
import math
import pathlib
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

from ghostserve.engine import sidecar_process
from ghostserve.engine.reference import config, engine, harness, recovery, workload
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

DEMO_MODEL = config.ModelConfig(vocab=1024, hidden=256, layers=4, heads=8, kv_heads=4, head_dim=32, ffn=512)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ghostserve demo --no-cluster", description=__doc__.split("\n")[0])
    p.add_argument("--code", default="xor", choices=["xor", "rdp", "rs", "replicate", "none"])
    p.add_argument("--tp", type=int, default=4, help="tensor-parallel ranks (processes)")
    p.add_argument("--requests", type=int, default=4)
    p.add_argument("--prompt", type=int, default=3072, help="prompt tokens per request")
    p.add_argument("--tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--chunk", type=int, default=64, help="chunk tokens T")
    p.add_argument("--lose", type=int, default=1, help="ranks lost in the device fault (2 needs rdp/rs)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(list(argv))


def _options(args: argparse.Namespace) -> engine.Options:
    need = args.requests * (args.prompt + args.tokens)
    slots = math.ceil(need * 1.25 / args.chunk + args.requests) * args.chunk
    return engine.Options(
        tp=args.tp,
        code=args.code,
        chunk_tokens=args.chunk,
        page_size=args.chunk,
        pool_slots=slots,
        record_digests=True,
    )


def _serve(
    label: str,
    args: argparse.Namespace,
    sc: sidecar_process.SidecarProcess,
    workdir: pathlib.Path,
    faults: Sequence[engine.Fault],
    progress: Progress,
    measured: dict[str, float],
) -> harness.RunResult:
    reqs = workload.make_requests(
        args.requests,
        prompt_tokens=args.prompt,
        new_tokens=args.tokens,
        vocab=DEMO_MODEL.vocab,
        seed=args.seed,
    )
    task = progress.add_task(label, total=args.requests * args.tokens)

    def tick(eng: engine.ReferenceEngine) -> None:
        done = sum(len(r.output) for r in list(eng.requests.values()) + list(eng.finished.values()))
        progress.update(task, completed=done)
        if eng.recoveries and "from_scratch_s" not in measured and faults:
            # Right after the recovery, in the same run: how long recomputing every request's KV from
            # scratch (the `none` baseline) takes on the same ranks.
            progress.update(task, description=f"{label}: timing full recompute")
            ranges = {r.request_id: [(0, r.kv_len)] for r in eng.requests.values() if r.kv_len}
            t0 = time.perf_counter()
            eng.replay(ranges)
            measured["from_scratch_s"] = time.perf_counter() - t0
            measured["from_scratch_tokens"] = sum(b for spans in ranges.values() for _, b in spans)
            progress.update(task, description=label)

    res = harness.run(
        DEMO_MODEL,
        _options(args),
        reqs,
        sidecar=sc,
        group=f"demo-{label.split()[0]}",
        workdir=workdir / label.split()[0],
        faults=faults,
        on_step=tick,
    )
    progress.update(task, completed=args.requests * args.tokens)
    return res


def _report(
    console: Console,
    args: argparse.Namespace,
    base: harness.RunResult,
    res: harness.RunResult,
    measured: dict[str, float],
    identical: bool,
    kv_identical: bool,
) -> None:
    rec: recovery.RecoveryReport = res.recoveries[0]
    t = Table(
        title=f"GhostServe demo: TP={args.tp}, code={args.code}, {args.requests} requests of "
        f"~{args.prompt}+{args.tokens} tokens, device fault on rank(s) {', '.join(map(str, rec.lost_ranks))}"
    )
    scratch = measured.get("from_scratch_s", float("nan"))
    rows = [
        ("bytes rebuilt (survivors + parity)", f"{rec.bytes_rebuilt:,}"),
        ("chunks rebuilt / recomputed", f"{rec.chunks_rebuilt} / {rec.chunks_recomputed}"),
        ("tokens recomputed (incl. tail)", f"{rec.tokens_recomputed:,}"),
        ("plan: first r chunks recomputed", " ".join(f"{v}" for v in rec.plan.values())),
        ("restart ranks, re-attach pools", f"{rec.restart_s:.3f} s"),
        ("restore KV (rebuild ‖ head, tail)", f"{rec.restore_s:.3f} s"),
        ("  rebuild / head / after", f"{rec.rebuild_s:.3f} / {rec.head_s:.3f} / {rec.after_s:.3f} s"),
        (f"recompute from scratch, {int(measured.get('from_scratch_tokens', 0)):,} tok", f"{scratch:.3f} s"),
        ("restore vs from scratch", f"{scratch / rec.restore_s:.1f}x faster" if rec.restore_s else "n/a"),
        ("with restart on both sides", f"{(rec.restart_s + scratch) / rec.total_s:.1f}x faster"),
        ("output tokens = fault-free run", "[green]yes[/]" if identical else "[red]NO[/]"),
        ("KV bytes = fault-free run", "[green]yes[/]" if kv_identical else "[red]NO[/]"),
    ]
    t.add_column("what")
    t.add_column("measured", justify="right")
    for row in rows:
        t.add_row(*row)
    console.print(t)
    console.print("Measured on this machine; both sides of each ratio ran on the same ranks in the same run.")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    console = Console()
    try:
        DEMO_MODEL.check_tp(args.tp)
    except config.ConfigError as exc:
        console.print(f"[red]ghostserve demo:[/] {exc}")
        return 2
    if not 1 <= args.lose < args.tp or args.requests < 1 or args.tokens < 4 or args.prompt < 1:
        console.print("[red]ghostserve demo:[/] need 1 <= --lose < --tp, --requests >= 1, --tokens >= 4")
        return 2
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="gs-demo-", dir="/tmp"))
    sc = sidecar_process.SidecarProcess(workdir / "sidecar")
    measured: dict[str, float] = {}
    try:
        with console.status("starting the sidecar"):
            sc.start()
        # Mid-decode: every request finished its prefill and generated half its tokens.
        at = math.ceil(args.prompt / args.chunk) + args.tokens // 2
        fault = engine.Fault(at, "device", tuple(range(1, 1 + args.lose)))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=console) as progress:
            base = _serve("fault-free run", args, sc, workdir, (), progress, measured)
            res = _serve("run with device fault", args, sc, workdir, (fault,), progress, measured)
        identical = res.outputs == base.outputs
        kv_identical = res.digests == base.digests
        _report(console, args, base, res, measured, identical, kv_identical)
        return 0 if identical and kv_identical and res.recoveries else 1
    finally:
        sc.stop()
        shutil.rmtree(workdir, ignore_errors=True)
