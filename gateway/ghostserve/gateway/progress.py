"""What a request has produced so far, across backend attempts (pure: no I/O).

A backend's `/generate` stream reports, per event, the attempt's cumulative `output_ids` and `text`.
When a backend fails mid-stream, the next attempt is the same rid with prompt + every token the client
has been sent as `input_ids` and the budget reduced by them, so the tokens it produces continue the
output exactly: nothing is sent twice and nothing is skipped.
"""

from __future__ import annotations

import dataclasses
from typing import Any


class ProtocolError(RuntimeError):
    """A backend event that cannot be a continuation of what was received (a broken backend)."""


@dataclasses.dataclass(frozen=True)
class Attempt:
    """One submission of the request to a backend."""

    backend: str
    input_tokens: int
    cached_tokens: int = 0


@dataclasses.dataclass
class Progress:
    """Tokens and text produced for one request so far; `update` feeds one backend event."""

    rid: str
    prompt_ids: list[int]
    max_new_tokens: int | None
    sampling: dict[str, Any]
    output_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: dict[str, Any] | None = None
    attempts: list[Attempt] = dataclasses.field(default_factory=list)
    # Where the current attempt's cumulative output starts in output_ids / text.
    _base_ids: int = 0
    _base_text: int = 0

    @property
    def remaining(self) -> int | None:
        if self.max_new_tokens is None:
            return None
        return self.max_new_tokens - len(self.output_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.remaining == 0

    def next_body(self, backend: str) -> dict[str, Any]:
        """The `/generate` body of the next attempt (records it). Raises ProtocolError when done."""
        if self.done:
            raise ProtocolError(f"{self.rid}: nothing left to generate")
        self._base_ids, self._base_text = len(self.output_ids), len(self.text)
        input_ids = self.prompt_ids + self.output_ids
        self.attempts.append(Attempt(backend, len(input_ids)))
        params = dict(self.sampling)
        if self.remaining is not None:
            params["max_new_tokens"] = self.remaining
        return {"rid": self.rid, "input_ids": input_ids, "sampling_params": params, "stream": True}

    def update(self, event: dict[str, Any]) -> tuple[list[int], str]:
        """Apply one event of the current attempt; returns the new tokens and new text it carried.

        Raises ProtocolError when the event's cumulative output shrank (not a continuation).
        """
        ids = event.get("output_ids")
        text = event.get("text", "")
        meta = event.get("meta_info") or {}
        if not isinstance(ids, list) or not isinstance(text, str) or not isinstance(meta, dict):
            raise ProtocolError(f"{self.rid}: malformed event {str(event)[:200]}")
        seen_ids = len(self.output_ids) - self._base_ids
        seen_text = len(self.text) - self._base_text
        if len(ids) < seen_ids or len(text) < seen_text:
            raise ProtocolError(f"{self.rid}: the backend's cumulative output shrank")
        new_ids = [int(x) for x in ids[seen_ids:]]
        new_text = text[seen_text:]
        self.output_ids += new_ids
        self.text += new_text
        if self.attempts and "cached_tokens" in meta:
            last = self.attempts[-1]
            self.attempts[-1] = dataclasses.replace(last, cached_tokens=int(meta["cached_tokens"] or 0))
        finish = meta.get("finish_reason")
        if isinstance(finish, dict) and finish.get("type") != "abort":
            self.finish_reason = finish
        elif self.remaining == 0:
            self.finish_reason = {"type": "length", "length": self.max_new_tokens}
        return new_ids, new_text

    def aborted(self, event: dict[str, Any]) -> str | None:
        """The abort message when `event` says the backend aborted the request (then it is retried)."""
        finish = (event.get("meta_info") or {}).get("finish_reason")
        if isinstance(finish, dict) and finish.get("type") == "abort":
            return str(finish.get("message") or "aborted")
        return None

    def meta_info(self, last: dict[str, Any]) -> dict[str, Any]:
        """The client's meta_info: the backend's latest, with counts over the whole request."""
        meta = dict(last)
        meta["id"] = self.rid
        meta["prompt_tokens"] = len(self.prompt_ids)
        meta["completion_tokens"] = len(self.output_ids)
        meta["finish_reason"] = self.finish_reason
        meta["ghostserve"] = {
            "resumes": max(0, len(self.attempts) - 1),
            "attempts": [dataclasses.asdict(a) for a in self.attempts],
        }
        return meta
