"""Weights and the batch-invariant tensor-parallel forward pass of the reference decoder.

Batch invariance (docs/design.md §11): every matmul, norm and attention runs per request, so a request's
numbers never depend on which other requests share the step; replaying a request with the same
chunk boundaries and decode steps therefore writes bit-identical KV. Only the all-reduces are shared
by the whole step, and they sum the ranks' partials in rank order, elementwise, so they are
batch-invariant too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol

import torch
from ghostserve.engine.reference import config as config_mod


class Collective(Protocol):
    """Sums a tensor over the ranks of the group; every rank gets bit-identical results."""

    def allreduce(self, x: torch.Tensor) -> torch.Tensor: ...


class LocalCollective:
    """World size 1: the sum over one rank is the tensor itself."""

    def allreduce(self, x: torch.Tensor) -> torch.Tensor:
        return x


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor
    wq: torch.Tensor  # [hidden, hq*D]   column-parallel
    wk: torch.Tensor  # [hidden, hkv*D]  column-parallel
    wv: torch.Tensor  # [hidden, hkv*D]
    wo: torch.Tensor  # [hq*D, hidden]   row-parallel
    mlp_norm: torch.Tensor
    w_gate: torch.Tensor  # [hidden, ffn/tp]
    w_up: torch.Tensor  # [hidden, ffn/tp]
    w_down: torch.Tensor  # [ffn/tp, hidden]


@dataclasses.dataclass
class RankWeights:
    config: config_mod.ModelConfig
    tp: int
    rank: int
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor
    inv_freq: torch.Tensor


def build_weights(cfg: config_mod.ModelConfig, *, tp: int, rank: int) -> RankWeights:
    """Seeded full weights, sliced to ``rank``'s share. Identical on every rank and every run."""
    cfg.check_tp(tp)
    gen = torch.Generator().manual_seed(cfg.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) / shape[0] ** 0.5

    d, hq, hkv = cfg.head_dim, cfg.q_heads_per_rank(tp), cfg.kv_heads_per_rank(tp)
    q0, k0 = rank * hq * d, cfg.first_kv_head(tp, rank) * d
    f = cfg.ffn // tp
    embed = torch.randn(cfg.vocab, cfg.hidden, generator=gen)
    layers = []
    for _ in range(cfg.layers):
        wq, wk, wv = (
            rand(cfg.hidden, cfg.heads * d),
            rand(cfg.hidden, cfg.kv_heads * d),
            rand(cfg.hidden, cfg.kv_heads * d),
        )
        wo = rand(cfg.heads * d, cfg.hidden)
        gate, up, down = rand(cfg.hidden, cfg.ffn), rand(cfg.hidden, cfg.ffn), rand(cfg.ffn, cfg.hidden)
        norm1 = 1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen)
        norm2 = 1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen)
        layers.append(
            LayerWeights(
                attn_norm=norm1,
                wq=wq[:, q0 : q0 + hq * d].contiguous(),
                wk=wk[:, k0 : k0 + hkv * d].contiguous(),
                wv=wv[:, k0 : k0 + hkv * d].contiguous(),
                wo=wo[q0 : q0 + hq * d].contiguous(),
                mlp_norm=norm2,
                w_gate=gate[:, rank * f : (rank + 1) * f].contiguous(),
                w_up=up[:, rank * f : (rank + 1) * f].contiguous(),
                w_down=down[rank * f : (rank + 1) * f].contiguous(),
            )
        )
    final_norm = 1.0 + 0.1 * torch.randn(cfg.hidden, generator=gen)
    lm_head = rand(cfg.hidden, cfg.vocab)
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return RankWeights(cfg, tp, rank, embed, layers, final_norm, lm_head, inv_freq.float())


@dataclasses.dataclass
class Piece:
    """One request's share of a step: input tokens at positions [start, start+len(tokens)).

    context_slots: pool slot of every position [0, start+len(tokens)); the last len(tokens) are
    written by this step.
    """

    tokens: torch.Tensor  # int64 [n]
    start: int
    context_slots: torch.Tensor  # int64 [start+n]
    # Compute the positions one row at a time, exactly as n decode steps would (replay of decode tokens).
    rowwise: bool = False

    def rows(self) -> list[Piece]:
        """This piece as the single-token pieces of the decode steps that first computed it."""
        if not self.rowwise:
            return [self]
        n = self.tokens.shape[0]
        return [
            Piece(self.tokens[i : i + 1], self.start + i, self.context_slots[: self.start + i + 1])
            for i in range(n)
        ]


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    # x: [n, heads, D]; rotate-half convention.
    angles = positions.float()[:, None] * inv_freq[None, :]
    cos, sin = torch.cos(angles)[:, None, :], torch.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(
    w: RankWeights, lw: LayerWeights, h: torch.Tensor, piece: Piece, pool_layer: torch.Tensor
) -> torch.Tensor:
    """Attention of one request; writes its new K/V rows into pool_layer [2, slots, hkv, D]."""
    cfg, d = w.config, w.config.head_dim
    hq, hkv = cfg.q_heads_per_rank(w.tp), cfg.kv_heads_per_rank(w.tp)
    n = h.shape[0]
    positions = torch.arange(piece.start, piece.start + n)
    q = _rope((h @ lw.wq).view(n, hq, d), positions, w.inv_freq)
    k = _rope((h @ lw.wk).view(n, hkv, d), positions, w.inv_freq)
    v = (h @ lw.wv).view(n, hkv, d)
    new_slots = piece.context_slots[piece.start :]
    pool_layer[0].index_copy_(0, new_slots, k)
    pool_layer[1].index_copy_(0, new_slots, v)
    keys = pool_layer[0].index_select(0, piece.context_slots)  # [S, hkv, D]
    values = pool_layer[1].index_select(0, piece.context_slots)
    rep = hq // hkv
    # GQA without copying K/V: the rep query heads of a KV head form one [rep*n, D] matrix.
    qg = q.view(n, hkv, rep, d).permute(1, 2, 0, 3).reshape(hkv, rep * n, d)
    scores = (qg @ keys.permute(1, 2, 0)).view(hkv, rep, n, -1) / d**0.5  # [hkv, rep, n, S]
    if n > 1:
        s = piece.context_slots.shape[0]
        mask = torch.arange(s)[None, :] > positions[:, None]
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).view(hkv, rep * n, -1)
    out = (probs @ values.transpose(0, 1)).view(hkv, rep, n, d)  # [hkv, rep, n, D]
    return out.permute(2, 0, 1, 3).reshape(n, hq * d) @ lw.wo


def forward(
    w: RankWeights, pieces: Sequence[Piece], pool: torch.Tensor, coll: Collective
) -> list[torch.Tensor]:
    """One step over several requests; writes their KV into ``pool`` [L, 2, slots, hkv, D].

    Returns each request's last hidden state [hidden] (after the final norm). Every rank of the group
    must call this with the same pieces (the collectives pair up layer by layer).
    """
    cfg = w.config
    # Row-wise pieces become their decode steps; they run in order inside each layer, so every row
    # attends to the K/V its predecessors wrote at that layer, as in the original decode steps.
    owners = [i for i, p in enumerate(pieces) for _ in p.rows()]
    pieces = [r for p in pieces for r in p.rows()]
    hs = [w.embed[p.tokens] for p in pieces]
    sizes = [p.tokens.shape[0] for p in pieces]
    for li, lw in enumerate(w.layers):
        partial = [
            _attention(w, lw, _rms_norm(h, lw.attn_norm, cfg.norm_eps), p, pool[li])
            for h, p in zip(hs, pieces, strict=True)
        ]
        summed = coll.allreduce(torch.cat(partial)).split(sizes)
        hs = [h + a for h, a in zip(hs, summed, strict=True)]
        partial = []
        for h in hs:
            x = _rms_norm(h, lw.mlp_norm, cfg.norm_eps)
            partial.append((torch.nn.functional.silu(x @ lw.w_gate) * (x @ lw.w_up)) @ lw.w_down)
        summed = coll.allreduce(torch.cat(partial)).split(sizes)
        hs = [h + m for h, m in zip(hs, summed, strict=True)]
    last = {owner: h for owner, h in zip(owners, hs, strict=True)}  # the last row of each input piece
    return [_rms_norm(last[i][-1:], w.final_norm, cfg.norm_eps)[0] for i in sorted(last)]


def greedy(w: RankWeights, last_hidden: Sequence[torch.Tensor]) -> list[int]:
    """Greedy next token of each request (per request, so batch-invariant)."""
    return [int(torch.argmax(h[None] @ w.lm_head)) for h in last_hidden]
