"""Request sets for tests, the demo and benchmarks: seeded random prompts, optional Poisson arrivals."""

from __future__ import annotations

import random

from ghostserve.engine.reference import engine as engine_mod


def make_requests(
    n: int,
    *,
    prompt_tokens: int,
    new_tokens: int,
    vocab: int,
    seed: int = 0,
    rate_per_s: float | None = None,
    prefix: str = "req",
    jitter: float = 0.25,
) -> list[engine_mod.Request]:
    """``n`` requests with seeded random prompts (lengths up to ``jitter`` below ``prompt_tokens``).

    rate_per_s: Poisson arrivals (exponential gaps) at this mean rate; None = all arrive at t=0.
    """
    rng = random.Random(seed)
    out, t = [], 0.0
    for i in range(n):
        length = max(1, prompt_tokens - rng.randrange(0, max(1, int(prompt_tokens * jitter) + 1)))
        prompt = [rng.randrange(vocab) for _ in range(length)]
        if rate_per_s:
            t += rng.expovariate(rate_per_s)
        out.append(
            engine_mod.Request(f"{prefix}-{i}", prompt, new_tokens, arrival_s=t if rate_per_s else 0.0)
        )
    return out
