"""TEST-ONLY STAND-IN for the `sgl_kernel` package, so that sglang 0.5.23 serves on a CPU in tests.

No CPU build of sgl_kernel exists on any registry, and sglang's CPU engine imports two of its ops at
module level. This stand-in implements exactly those two in plain torch, with the semantics of
sglang's own Triton kernels for the GPU path (sglang.srt.mem_cache.allocation and
sglang.kernels.ops.kvcache.cache_move). Every other name is a function that raises when called, and
`convert_weight_packed` is absent, so sglang's layers take their native torch path
(sglang.srt.utils.common._is_intel_amx_backend_available returns False).

Put `tests/sglang/standin_sgl_kernel` on PYTHONPATH of the sglang server process only; never install it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any, NoReturn

import torch

STANDIN = True  # tests assert they run against this stand-in, not a real sgl_kernel


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    max_context_len: int,
) -> None:
    """req_to_token[row_i, start_i:end_i] = the next end_i - start_i entries of out_cache_loc."""
    offset = 0
    for row, start, end in zip(
        req_pool_indices.tolist(), start_offset.tolist(), end_offset.tolist(), strict=True
    ):
        n = int(end) - int(start)
        if n <= 0:
            continue
        if int(end) > max_context_len:
            raise ValueError(f"end offset {end} beyond the context length {max_context_len}")
        req_to_token[int(row), int(start) : int(end)] = out_cache_loc[offset : offset + n].to(
            req_to_token.dtype
        )
        offset += n


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor, strides: torch.Tensor, tgt_loc: torch.Tensor, src_loc: torch.Tensor
) -> None:
    """For every buffer i: copy the `strides[i]` bytes of slot src_loc[j] to slot tgt_loc[j]."""
    for ptr, stride in zip(data_ptrs.tolist(), strides.tolist(), strict=True):
        for tgt, src in zip(tgt_loc.tolist(), src_loc.tolist(), strict=True):
            if tgt != src:
                base, width = int(ptr), int(stride)
                ctypes.memmove(base + int(tgt) * width, base + int(src) * width, width)


_ABSENT = frozenset({"convert_weight_packed", "convert_weight_packed_scale_zp"})


def __getattr__(name: str) -> Callable[..., NoReturn]:
    if name.startswith("__") or name in _ABSENT:
        raise AttributeError(name)

    def unavailable(*_: Any, **__: Any) -> NoReturn:
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by GhostServe's test-only sgl_kernel stand-in"
        )

    unavailable.__name__ = name
    return unavailable
