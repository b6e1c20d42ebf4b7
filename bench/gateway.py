"""Resume gateway overhead per token, measured side by side with the same backend in one run.

A real sglang server (tp=1, the tiny test model, CPU) serves the same streaming greedy request
directly and through a real `ghostserve gateway` process (run from .venv when there is one), in
alternating order. Per side: inter-token time (last token time - first token time) / (tokens - 1) and
time to first token. Both sides stream the same tokens; the ratio is gateway / direct per token.

usage: .venv-sglang/bin/python bench/gateway.py [--repeat 5] [--tokens 128]
Writes bench/results/gateway-<machine>.json.
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
from typing import Any

import benchlib
import requests
from rich.progress import Progress

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "sglang"))
import sgl_server  # noqa: E402
import tiny_model  # noqa: E402


def stream_once(url: str, rid: str, prompt: list[int], tokens: int) -> dict[str, float]:
    body = {"rid": rid, "input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}}
    start = time.perf_counter()
    first = last = 0.0
    n = 0
    with requests.post(url + "/generate", json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            ids = json.loads(line[5:])["output_ids"]
            now = time.perf_counter()
            if n == 0 and ids:
                first = now
            if len(ids) > n:
                n, last = len(ids), now
    if n != tokens:
        raise RuntimeError(f"{url}: {n} tokens streamed, expected {tokens}")
    return {"per_token_ms": (last - first) / (n - 1) * 1e3, "ttft_ms": (first - start) * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = benchlib.repeat_parser(__doc__.splitlines()[0], repeat=5)
    p.add_argument("--tokens", type=int, default=128)
    args = benchlib.parse_repeat(p, argv)
    load_before = benchlib.load_average()
    work = pathlib.Path(tempfile.mkdtemp(prefix="gs-bench-gw-"))
    model = tiny_model.make(work / "model", seed=0)
    prompt = [int(x) + 3 for x in range(64)]
    server = sgl_server.Server(model, port=sgl_server.free_port(), tp=1, env=sgl_server.cpu_env(tp=1),
                               log=work / "sglang.log")
    main_venv = REPO / ".venv" / "bin" / "python"
    python = str(main_venv) if main_venv.exists() else sys.executable
    rounds: list[dict[str, Any]] = []
    try:
        server.start()
        with sgl_server.run_gateway(server.url, log=work / "gateway.log", python=python) as gw:
            stream_once(server.url, "warm-d", prompt, 8)
            stream_once(gw, "warm-g", prompt, 8)
            with Progress() as bar:
                task = bar.add_task("direct vs gateway", total=args.repeat)
                for i in range(args.repeat):
                    order = [("direct", server.url), ("gateway", gw)]
                    if i % 2:
                        order.reverse()
                    got = {name: stream_once(url, f"{name}-{i}", prompt, args.tokens) for name, url in order}
                    rounds.append(got)
                    bar.advance(task)
    finally:
        server.stop()
    ratios = [r["gateway"]["per_token_ms"] / r["direct"]["per_token_ms"] for r in rounds]
    extra = [r["gateway"]["per_token_ms"] - r["direct"]["per_token_ms"] for r in rounds]
    report = {
        **benchlib.report_head("gateway", load_before),
        "setup": {"backend": "sglang 0.5.23 launch_server tp=1, tiny LLaMA (2 layers, float32), CPU",
                  "tokens_per_request": args.tokens, "prompt_tokens": len(prompt), "stream": True},
        "per_token_ratio_gateway_over_direct": benchlib.spread(ratios),
        "per_token_extra_ms": benchlib.spread(extra),
        "direct_per_token_ms": benchlib.spread([r["direct"]["per_token_ms"] for r in rounds]),
        "gateway_per_token_ms": benchlib.spread([r["gateway"]["per_token_ms"] for r in rounds]),
        "direct_ttft_ms": benchlib.spread([r["direct"]["ttft_ms"] for r in rounds]),
        "gateway_ttft_ms": benchlib.spread([r["gateway"]["ttft_ms"] for r in rounds]),
    }
    return benchlib.finish("gateway", report, ("per_token_ratio_gateway_over_direct", "per_token_extra_ms"))


if __name__ == "__main__":
    sys.exit(main())
