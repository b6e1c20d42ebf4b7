"""The reference model's tokenizer: UTF-8 bytes, one token per byte (pure, deterministic).

Token ids 0..255 are the bytes of the UTF-8 encoding of the text; the model's vocabulary is larger
(512 by default), so generated ids >= 256 have no byte: they decode to ``<|id|>``. Decoding replaces
invalid UTF-8 (random weights produce arbitrary bytes) with U+FFFD, so decoding never fails. This is
a stand-in for a real tokenizer: the reference model has random weights, its text means nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

BYTES = 256


class TokenizerError(ValueError):
    """A vocabulary too small for byte tokens."""


class ByteTokenizer:
    def __init__(self, vocab: int) -> None:
        if vocab < BYTES:
            raise TokenizerError(f"a byte tokenizer needs a vocabulary of >= {BYTES}, got {vocab}")
        self.vocab = vocab

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < BYTES:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run.clear()
            out.append(f"<|{i}|>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
