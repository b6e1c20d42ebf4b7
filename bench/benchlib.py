"""What every benchmark records about the machine it ran on, and how it summarises repeated samples
(imported by the scripts beside it)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from typing import Any


def machine() -> dict[str, Any]:
    """CPU model, core count, a file-name slug (e.g. `amd-epyc-7b13-2c`) and the Python version."""
    model = platform.processor() or "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux: platform.processor() is the best there is
        pass
    cores = os.cpu_count() or 0
    slug = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-")[:40]
    return {
        "cpu": model,
        "cores": cores,
        "slug": f"{slug}-{cores}c",
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        # Benchmarks report ratios measured side by side, but a busy machine still skews them: say how busy.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def write_report(path: pathlib.Path, report: dict[str, Any]) -> pathlib.Path:
    """Write a benchmark's JSON report (creating bench/results/ if needed); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def save(path: pathlib.Path, report: dict[str, Any], say: Callable[[str], object] = print) -> int:
    """Write the report, say where; a benchmark's exit code (0)."""
    say(f"wrote {write_report(path, report)}")
    return 0


def load_average() -> dict[str, float]:
    """The 1/5/15-minute load averages now: record them before and after a run (a ratio measured on a
    machine whose load rose during the run is less trustworthy than the before figure alone suggests)."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


def spread(samples: Sequence[float], digits: int = 3) -> dict[str, Any]:
    """Median, min and max of >= 3 samples (each a ratio measured side by side in one round)."""
    if len(samples) < 3:
        raise ValueError(f"need at least 3 samples for a median and spread, got {len(samples)}")
    return {
        "median": round(statistics.median(samples), digits),
        "min": round(min(samples), digits),
        "max": round(max(samples), digits),
        "samples": [round(x, digits) for x in samples],
    }


RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def repeat_parser(description: str, repeat: int) -> argparse.ArgumentParser:
    """A benchmark's argument parser with its --repeat (checked by parse_repeat)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--repeat", type=int, default=repeat)
    return p


def parse_repeat(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse argv, refusing fewer than 3 repeats (a median and spread need 3)."""
    args = p.parse_args(argv)
    if args.repeat < 3:
        p.error("--repeat must be >= 3 (median and spread)")
    return args


def report_head(benchmark: str, load_before: dict[str, float]) -> dict[str, Any]:
    """The fields every report starts with: what, when, where, and the load around the run."""
    return {
        "benchmark": benchmark,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load_average(),
    }


def finish(name: str, report: dict[str, Any], headline: Sequence[str]) -> int:
    """Write bench/results/<name>-<machine>.json, print its headline figures and the path; exit code 0."""
    out = write_report(RESULTS / f"{name}-{report['machine']['slug']}.json", report)
    print(json.dumps({k: report[k] for k in headline}))
    print(f"wrote {out}")
    return 0
