"""The client's view of a request: sglang-native or OpenAI-shaped, streamed or whole (pure).

Native streams carry the cumulative output so far in every event, as sglang does; OpenAI streams
carry deltas. Either way the client cannot tell from the shape that a backend failed in between; the
native meta_info says so in its `ghostserve` field (how many resumes, each attempt's cached tokens).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ghostserve.gateway import progress as progress_mod
from ghostserve.gateway import requests as req_mod

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def openai_finish(progress: progress_mod.Progress) -> str | None:
    finish = progress.finish_reason
    if finish is None:
        return None
    return "length" if finish.get("type") == "length" else "stop"


class Renderer:
    """Formats one request's events for its endpoint."""

    def __init__(self, job: req_mod.Job, progress: progress_mod.Progress) -> None:
        self.job = job
        self.progress = progress
        self.created = int(time.time())
        self.last_meta: dict[str, Any] = {}
        self._role_sent = False

    @property
    def response_id(self) -> str:
        prefix = {"completions": "cmpl-", "chat": "chatcmpl-"}.get(self.job.kind.value, "")
        return prefix + self.job.rid

    def stream_chunks(self, new_ids: list[int], new_text: str) -> list[bytes]:
        """SSE events for one backend event that added `new_ids`/`new_text` (may be none)."""
        p = self.progress
        kind = self.job.kind
        if kind is req_mod.Kind.GENERATE:
            if not new_ids and not new_text and p.finish_reason is None:
                return []
            meta = p.meta_info(self.last_meta)
            return [sse({"text": p.text, "output_ids": p.output_ids, "meta_info": meta})]
        finish = openai_finish(p)
        if not new_text and finish is None and (self._role_sent or kind is req_mod.Kind.COMPLETIONS):
            return []
        out = []
        if kind is req_mod.Kind.CHAT:
            delta: dict[str, Any] = {"content": new_text}
            if not self._role_sent:
                delta["role"] = "assistant"
                self._role_sent = True
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            out.append(sse(self._envelope("chat.completion.chunk", choice)))
        else:
            choice = {"index": 0, "text": new_text, "logprobs": None, "finish_reason": finish}
            out.append(sse(self._envelope("text_completion", choice)))
        if finish is not None and self.job.include_usage:
            out.append(sse({**self._envelope(self._chunk_object(), None), "usage": self.usage()}))
        return out

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.job.kind is req_mod.Kind.CHAT else "text_completion"

    def _envelope(self, obj: str, choice: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.response_id,
            "object": obj,
            "created": self.created,
            "model": self.job.model,
            "choices": [] if choice is None else [choice],
        }

    def usage(self) -> dict[str, int]:
        p = self.progress
        return {
            "prompt_tokens": len(p.prompt_ids),
            "completion_tokens": len(p.output_ids),
            "total_tokens": len(p.prompt_ids) + len(p.output_ids),
        }

    def whole(self) -> dict[str, Any]:
        """The non-streamed response once the request finished."""
        p = self.progress
        kind = self.job.kind
        if kind is req_mod.Kind.GENERATE:
            return {"text": p.text, "output_ids": p.output_ids, "meta_info": p.meta_info(self.last_meta)}
        finish = openai_finish(p)
        if kind is req_mod.Kind.CHAT:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": p.text},
                "logprobs": None,
                "finish_reason": finish,
            }
            body = self._envelope("chat.completion", choice)
        else:
            choice = {"index": 0, "text": p.text, "logprobs": None, "finish_reason": finish}
            body = self._envelope("text_completion", choice)
        body["usage"] = self.usage()
        return body


def error_body(kind: req_mod.Kind, status: int, message: str) -> dict[str, Any]:
    """sglang's and OpenAI's error shape (they agree)."""
    kind_name = "BadRequest" if status < 500 else "ServiceUnavailable"
    return {"object": "error", "message": message, "type": kind_name, "param": None, "code": status}
