"""Print the fault campaign's table (fault kind x code) from GHOSTSERVE_CAMPAIGN_LOG lines.

    python tests/e2e/campaign_table.py /tmp/campaign.jsonl
"""

from __future__ import annotations

import collections
import json
import sys
from typing import Any

# Injections a run of each kind makes when every planned fault fired (campaign.Injector.fired).
EXPECTED = {
    "process@step": 1,
    "device@step": 2,
    "process@finish": 1,
    "process@replay": 3,
    "device@replay": 4,
    "process@restore": 3,
    "sidecar@rebuild": 3,
    "sidecar@step": 3,
}


def table(lines: list[str]) -> str:
    runs = [json.loads(line) for line in lines if line.strip()]
    codes = sorted({r["code"] for r in runs}, key=["xor", "rdp", "rs"].index)
    kinds = list(dict.fromkeys(r["kind"] for r in runs))
    cell: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for r in runs:
        cell[(r["kind"], r["code"])].append(r)
    out = ["| fault kind | " + " | ".join(codes) + " |", "|---|" + "---|" * len(codes)]
    for kind in kinds:
        row = []
        for code in codes:
            rs = cell[(kind, code)]
            wrong = sum(r["wrong_requests"] for r in rs)
            lost = sum(r["lost_requests"] for r in rs)
            fired = sum(len(r["fired"]) >= EXPECTED[kind] for r in rs)
            row.append(f"{len(rs)} runs, {wrong} wrong, {lost} lost ({fired} with every fault fired)")
        out.append(f"| {kind} | " + " | ".join(row) + " |")
    total = len(runs)
    out.append(
        f"\n{total} runs: {sum(r['wrong_requests'] for r in runs)} wrong requests, "
        f"{sum(r['lost_requests'] for r in runs)} lost, {sum(r['recoveries'] for r in runs)} recoveries, "
        f"{sum(r['seconds'] for r in runs):.0f} s"
    )
    return "\n".join(out)


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        print(table(f.readlines()))
