"""Client requests the gateway accepts, parsed into one shape (pure: no I/O).

Every endpoint (sglang's native `/generate`, OpenAI `/v1/completions` and `/v1/chat/completions`) is
served by the backend's native `/generate` with token ids, because resuming needs the prompt and the
tokens generated so far as ids. Text prompts and chat messages are turned into ids by the backend's
`/tokenize` first (see upstream.py). Features that cannot be resumed token by token (several choices,
logprobs, tools, echo, batches) are refused with a clear 400.
"""

from __future__ import annotations

import dataclasses
import enum
import uuid
from typing import Any


class BadRequest(ValueError):
    """The client's request cannot be served by the gateway; the message says why (HTTP 400)."""


class Kind(enum.Enum):
    GENERATE = "generate"
    COMPLETIONS = "completions"
    CHAT = "chat"


# OpenAI sampling fields -> sglang sampling_params names.
_OPENAI_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "repetition_penalty": "repetition_penalty",
    "ignore_eos": "ignore_eos",
    "seed": "sampling_seed",
    "min_tokens": "min_new_tokens",
}
# Accepted and not needed by the backend.
_OPENAI_IGNORED = {"model", "user", "stream", "stream_options", "messages", "prompt", "max_tokens",
                   "max_completion_tokens", "n"}
# Refused when set to anything but their default: they cannot be resumed by resubmitting token ids.
_OPENAI_REFUSED = {"logprobs", "top_logprobs", "echo", "best_of", "tools", "tool_choice", "functions",
                   "response_format", "suffix", "logit_bias", "return_hidden_states"}
_GENERATE_FIELDS = {"rid", "text", "input_ids", "sampling_params", "stream"}

DEFAULT_OPENAI_MAX_TOKENS = 16  # OpenAI's documented default for completions
MAX_RID = 256


@dataclasses.dataclass(frozen=True)
class Job:
    """One client request, whatever its endpoint.

    Exactly one of `input_ids`, `text` and `messages` is set: the prompt as ids, as text for the
    backend's tokenizer, or as chat messages for its chat template.
    """

    kind: Kind
    rid: str
    stream: bool
    sampling: dict[str, Any]  # sglang sampling_params without max_new_tokens
    max_new_tokens: int | None  # None: the backend's default (up to the context length)
    input_ids: tuple[int, ...] | None = None
    text: str | None = None
    messages: tuple[dict[str, Any], ...] | None = None
    model: str = "default"
    include_usage: bool = False  # OpenAI stream_options.include_usage


def new_rid() -> str:
    return uuid.uuid4().hex


def parse(kind: Kind, body: Any) -> Job:
    """Parse a client's JSON body for endpoint `kind`. Raises BadRequest naming the problem."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    if kind is Kind.GENERATE:
        return _parse_generate(body)
    return _parse_openai(kind, body)


def _parse_generate(body: dict[str, Any]) -> Job:
    unknown = sorted(k for k, v in body.items() if k not in _GENERATE_FIELDS and v not in (None, False))
    if unknown:
        raise BadRequest(f"/generate fields not supported by the resume gateway: {', '.join(unknown)}")
    rid = body.get("rid") or new_rid()
    if not isinstance(rid, str) or not 0 < len(rid) <= MAX_RID or not rid.isprintable() or " " in rid:
        raise BadRequest(f"rid must be a string of 1-{MAX_RID} printable characters without spaces")
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise BadRequest("give exactly one of text and input_ids")
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise BadRequest("sampling_params must be an object")
    if params.get("n", 1) != 1:
        raise BadRequest("sampling_params.n other than 1 is not supported by the resume gateway")
    sampling = {k: v for k, v in params.items() if k not in ("max_new_tokens", "n")}
    return Job(
        kind=Kind.GENERATE,
        rid=rid,
        stream=_flag(body.get("stream", False), "stream"),
        sampling=sampling,
        max_new_tokens=_budget(params.get("max_new_tokens", 128), "sampling_params.max_new_tokens"),
        input_ids=_ids(ids) if ids is not None else None,
        text=_text(text, "text") if text is not None else None,
    )


def _parse_openai(kind: Kind, body: dict[str, Any]) -> Job:
    refused = sorted(k for k in _OPENAI_REFUSED if body.get(k) not in (None, False, 0, [], {}))
    if refused:
        raise BadRequest(f"not supported by the resume gateway: {', '.join(refused)}")
    unknown = sorted(k for k in body if k not in _OPENAI_SAMPLING and k not in _OPENAI_IGNORED
                     and k not in _OPENAI_REFUSED)
    if unknown:
        raise BadRequest(f"unknown fields: {', '.join(unknown)}")
    if body.get("n", 1) != 1:
        raise BadRequest("n other than 1 is not supported by the resume gateway")
    sampling = {_OPENAI_SAMPLING[k]: v for k, v in body.items() if k in _OPENAI_SAMPLING and v is not None}
    sampling.setdefault("temperature", 1.0)
    budget = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    common: dict[str, Any] = {
        "kind": kind,
        "rid": new_rid(),
        "stream": _flag(body.get("stream", False), "stream"),
        "sampling": sampling,
        "model": str(body.get("model") or "default"),
        "include_usage": bool(options.get("include_usage", False)),
    }
    if kind is Kind.CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a non-empty list of objects")
        chat_limit = _budget(budget, "max_tokens") if budget is not None else None
        return Job(max_new_tokens=chat_limit, messages=tuple(messages), **common)
    prompt = body.get("prompt")
    limit = _budget(budget if budget is not None else DEFAULT_OPENAI_MAX_TOKENS, "max_tokens")
    if isinstance(prompt, str):
        return Job(max_new_tokens=limit, text=prompt, **common)
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return Job(max_new_tokens=limit, input_ids=_ids(prompt), **common)
    raise BadRequest("prompt must be one string or one list of token ids (batches are not supported)")


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def _budget(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"{name} must be a positive integer, got {value!r}")
    return value


def _ids(value: Any) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)
    ):
        raise BadRequest("input_ids must be one non-empty list of non-negative token ids (no batches)")
    return tuple(value)


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be one non-empty string (no batches)")
    return value
