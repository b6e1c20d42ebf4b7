"""What flows between the HTTP handlers and the serving loop: jobs, their events, held requests."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class Output:
    """Cumulative output of one request so far (``done``: the last one)."""

    output_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    done: bool
    max_new_tokens: int


@dataclasses.dataclass(frozen=True)
class Failure:
    message: str
    status: int = 500


Event = Output | Failure


@dataclasses.dataclass
class Job:
    """One HTTP request. ``emit`` is called on the driver thread (it must only hand the event over)."""

    rid: str
    input_ids: list[int]
    max_new_tokens: int
    emit: Callable[[Event], None]
    cached_tokens: int = 0
    sent: int = 0


@dataclasses.dataclass(frozen=True)
class Held:
    request_id: str
    prompt_len: int
    tokens: tuple[int, ...]
    deadline: float
