"""Which forward passes wrote which positions: the replay schedule that makes recompute bit-identical.

The engine prefills a prompt in pieces cut at multiples of the chunk size T and decodes one token per
step afterwards. Floating-point results depend on the work's shape (docs/design.md §11), so recompute after
a fault must cut exactly the same pieces. Pure functions of (prompt length, T).
"""

from __future__ import annotations


class ScheduleError(ValueError):
    """A replay range that would split a piece the engine computed in one pass."""


def next_piece(kv_len: int, prompt_len: int, chunk_tokens: int) -> tuple[int, int]:
    """The positions [start, end) the engine computes next for a request with ``kv_len`` cached tokens."""
    if kv_len < prompt_len:
        return kv_len, min(prompt_len, (kv_len // chunk_tokens + 1) * chunk_tokens)
    return kv_len, kv_len + 1


def pieces(start: int, end: int, *, prompt_len: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """The original forward passes covering positions [start, end), in order.

    Raises ScheduleError when start or end falls inside a prefill piece (replay would differ).
    """
    if start < 0 or end < start or chunk_tokens <= 0:
        raise ScheduleError(f"bad replay range [{start}, {end}) with chunk {chunk_tokens}")
    if start < prompt_len and start % chunk_tokens:
        raise ScheduleError(f"replay start {start} is inside a prefill piece")
    out = []
    pos = start
    while pos < end:
        a, b = next_piece(pos, prompt_len, chunk_tokens)
        if b > end:
            raise ScheduleError(f"replay end {end} splits the prefill piece [{a}, {b})")
        out.append((a, b))
        pos = b
    return out


def replay_passes(start: int, end: int, *, prompt_len: int, chunk_tokens: int) -> list[tuple[int, int, bool]]:
    """``pieces`` with every run of decode steps merged into one row-wise pass: (start, end, rowwise).

    A row-wise pass computes each position exactly as its decode step did (one row at a time, each
    attending to the positions before it), in one forward pass instead of one per token.
    """
    out: list[tuple[int, int, bool]] = []
    for a, b in pieces(start, end, prompt_len=prompt_len, chunk_tokens=chunk_tokens):
        if a >= prompt_len and out and out[-1][2] and out[-1][1] == a:
            out[-1] = (out[-1][0], b, True)
        else:
            out.append((a, b, a >= prompt_len))
    return out


def completed_chunks(start: int, end: int, chunk_tokens: int) -> range:
    """Chunks whose last token lies in [start, end): a pass over those positions completes them."""
    return range(-(-(start + 1) // chunk_tokens) - 1, end // chunk_tokens)
