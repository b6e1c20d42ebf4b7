"""Restore vs recompute of the same request on a real sglang server with GhostServe's plugin.

A real sidecar and a real sglang server (tp=1, the tiny test model, CPU, T=64). Each sample: a
streaming request with a long prompt is cut by SIGKILL of the scheduler after a few tokens; sglang's
tree goes down; the server is started again (not timed: a start is the same with or without
GhostServe) and restores the request's committed chunks into its radix cache. Then, side by side:

  restore:    the client's resubmission (same rid, prompt + tokens received) with the restored prefix,
              max_new_tokens=1: wall time of the request (prefill of the tail + one token);
  recompute:  /flush_cache, then the same input under another rid: the whole prefill + one token.

Both produce the same next token from the same input tokens; ratio = recompute / restore.
`cached_tokens` of each side is recorded (restore: the restored prefix; recompute: 0).

usage: .venv-sglang/bin/python bench/sglang.py [--repeat 3] [--prompt 1536]
Writes bench/results/sglang-<machine>.json.
"""

from __future__ import annotations

import pathlib
import signal
import sys
import tempfile
import time
from typing import Any

import benchlib
import requests
from rich.progress import Progress

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "sglang"))
import sgl_procs  # noqa: E402
import sgl_server  # noqa: E402
import tiny_model  # noqa: E402

T = 64
GROUP = "bench/sglang-g0"


def timed(url: str, rid: str, input_ids: list[int]) -> dict[str, Any]:
    body = {"rid": rid, "input_ids": input_ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    start = time.perf_counter()
    r = requests.post(url + "/generate", json=body, timeout=600)
    seconds = time.perf_counter() - start
    r.raise_for_status()
    out = r.json()
    return {"seconds": seconds, "cached_tokens": out["meta_info"]["cached_tokens"], "next": out["output_ids"]}


def committed(sidecar: sgl_procs.Sidecar, rid: str) -> int:
    with sidecar.client() as c:
        return next((r.chunks_committed for r in c.describe_group(group=GROUP).requests
                     if r.request_id == rid), 0)


def one_sample(
    server: sgl_server.Server, sidecar: sgl_procs.Sidecar, prompt: list[int], i: int
) -> dict[str, Any]:
    body = {"rid": f"v{i}", "input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0}}
    # Start from an empty cache: a prefill that duplicates a cached prefix is moved onto the tree's
    # slots by sglang a pass or two later, and the plugin then serves it unprotected (docs/sglang.md).
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()
    client = sgl_server.StreamClient(server.url, body, notify_at=4)
    client.start()
    if not client.reached.wait(600) or client.error is not None:
        raise RuntimeError(f"the stream did not start: {client.error}")
    # Kill once the prompt's chunks reached the sidecar (the background sender may lag on a busy box):
    # the figure is about restoring what was committed, not about how much was committed in time.
    sgl_procs.wait_until(lambda: committed(sidecar, f"v{i}") >= len(prompt) // T, timeout=120,
                         what="the prompt's chunks to be committed")
    server.scheduler(0).send_signal(signal.SIGKILL)
    server.wait_exit(120)
    client.join(30)
    received = client.events[-1]["output_ids"]
    server.start()
    timed(server.url, f"warm{i}", [5, 6, 7, 8])  # a fresh server's first request pays one-off costs
    tokens = prompt + received
    restore = timed(server.url, f"v{i}", tokens)
    requests.post(server.url + "/flush_cache", timeout=60).raise_for_status()
    recompute = timed(server.url, f"r{i}", tokens)
    if restore["next"] != recompute["next"]:
        raise RuntimeError(f"restore and recompute disagree: {restore['next']} != {recompute['next']}")
    return {"input_tokens": len(tokens), "restore": restore, "recompute": recompute}


def main(argv: list[str] | None = None) -> int:
    p = benchlib.repeat_parser(__doc__.splitlines()[0], repeat=3)
    p.add_argument("--prompt", type=int, default=1536)
    args = benchlib.parse_repeat(p, argv)
    load_before = benchlib.load_average()
    work = pathlib.Path(tempfile.mkdtemp(prefix="gs-bench-sgl-"))
    model = tiny_model.make(work / "model", seed=0)
    prompt = [3 + (7 * k) % 370 for k in range(args.prompt)]
    samples: list[dict[str, Any]] = []
    with sgl_procs.run_sidecar() as sidecar:
        env = sgl_server.cpu_env(tp=1)
        env.update(GHOSTSERVE_SGLANG="1", GHOSTSERVE_SIDECAR=sidecar.address, GHOSTSERVE_GROUP=GROUP,
                   GHOSTSERVE_CODE="none", GHOSTSERVE_CHUNK_TOKENS=str(T), SGLANG_PLUGINS="ghostserve")
        server = sgl_server.Server(model, port=sgl_server.free_port(), tp=1, env=env, log=work / "sglang.log")
        try:
            server.start()
            with Progress() as bar:
                task = bar.add_task("crash, restart, restore vs recompute", total=args.repeat)
                for i in range(args.repeat):
                    samples.append(one_sample(server, sidecar, prompt, i))
                    bar.advance(task)
        finally:
            server.stop()
            with sidecar.client() as c:
                c.delete_group(group=GROUP)
    report = {
        **benchlib.report_head("sglang-restore-vs-recompute", load_before),
        "setup": {"server": "sglang 0.5.23 launch_server tp=1, tiny LLaMA (2 layers, float32), CPU",
                  "chunk_tokens": T, "page_size": 4, "prompt_tokens": args.prompt,
                  "fault": "SIGKILL of the scheduler after 4 streamed tokens, once the prompt's chunks are "
                           "committed; server restarted (not timed) and warmed with a 4-token request"},
        "ratio_recompute_over_restore": benchlib.spread(
            [s["recompute"]["seconds"] / s["restore"]["seconds"] for s in samples]),
        "restore_seconds": benchlib.spread([s["restore"]["seconds"] for s in samples], 4),
        "recompute_seconds": benchlib.spread([s["recompute"]["seconds"] for s in samples], 4),
        "restore_cached_tokens": [s["restore"]["cached_tokens"] for s in samples],
        "recompute_cached_tokens": [s["recompute"]["cached_tokens"] for s in samples],
        "input_tokens": [s["input_tokens"] for s in samples],
    }
    return benchlib.finish("sglang", report, ("ratio_recompute_over_restore", "restore_cached_tokens"))


if __name__ == "__main__":
    sys.exit(main())
