"""Transformer decoder layers with key/value caching for incremental decoding.

Written out (rather than ``nn.TransformerDecoderLayer``) so that decoding can reuse the keys and
values of earlier positions, and so that cross-attention weights can be returned for attention
maps. Parameter shapes and counts equal PyTorch's layer (packed q/k/v projection + output
projection per attention, two feed-forward linears, three LayerNorms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MultiHeadAttention(nn.Module):
    """Multi-head attention with packed input projection (q, k, v) of shape (3H, H)."""

    def __init__(self, hidden_size: int, num_heads: int, dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"HIDDEN_SIZE {hidden_size} is not divisible by NUM_HEADS {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.in_proj = nn.Linear(hidden_size, 3 * hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, L, H) -> (B, heads, L, head_dim)
        b, length, _ = x.shape
        return x.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)

    def project_query(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.in_proj.weight, self.in_proj.bias
        h = w.shape[1]
        return self._heads(F.linear(x, w[:h], b[:h]))

    def project_query_key_value(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Self-attention: q, k and v of the same input in one product with the packed weight,
        whose gradient then comes out whole (slices of it would each be zero-padded to the
        full (3H, H) and summed in the backward pass)."""
        q, k, v = F.linear(x, self.in_proj.weight, self.in_proj.bias).chunk(3, dim=-1)
        return self._heads(q), self._heads(k), self._heads(v)

    def project_key_value(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = self.in_proj.weight, self.in_proj.bias
        h = w.shape[1]
        k, v = F.linear(x, w[h:], b[h:]).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        mask: torch.Tensor | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q: (B, heads, Lq, d); k, v: (B, heads, Lk, d); mask: bool, True = may attend,
        broadcastable to (B, heads, Lq, Lk). Returns (B, Lq, H) and optionally the weights
        (B, heads, Lq, Lk)."""
        drop = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            out = F.dropout(weights, drop, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        b, _, lq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, lq, -1)
        return self.out_proj(out), weights


class DecoderLayer(nn.Module):
    """Self-attention (masked as the caller says), cross-attention to the visual grid, GELU FFN.

    Post-norm (``norm_first=False``, the paper's default) or pre-norm.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        feedforward_size: int,
        dropout: float = 0.1,
        norm_first: bool = False,
    ):
        super().__init__()
        self.self_attn = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.cross_attn = MultiHeadAttention(hidden_size, num_heads, dropout)
        self.linear1 = nn.Linear(hidden_size, feedforward_size)
        self.linear2 = nn.Linear(feedforward_size, hidden_size)
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.norm3 = nn.LayerNorm(hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def _self_block(self, x, mask, cache):
        q, k, v = self.self_attn.project_query_key_value(x)
        if cache is not None:
            # Earlier positions' keys/values do not change when tokens are appended (causal
            # masking), so they are reused instead of recomputed.
            if "k" in cache:
                k = torch.cat([cache["k"], k], dim=2)
                v = torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        out, _ = self.self_attn.attend(q, k, v, mask)
        return self.dropout(out)

    def _cross_block(self, x, memory_kv, need_weights):
        q = self.cross_attn.project_query(x)
        out, weights = self.cross_attn.attend(q, *memory_kv, need_weights=need_weights)
        return self.dropout(out), weights

    def _ff_block(self, x):
        return self.dropout(self.linear2(self.dropout(F.gelu(self.linear1(x)))))

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: tuple[torch.Tensor, torch.Tensor],
        self_mask: torch.Tensor | None = None,
        cache: dict | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, L, H); memory_kv: cross-attention keys/values (B, heads, N, d) each.
        Returns (B, L, H) and cross-attention weights (B, heads, L, N) if asked for."""
        if self.norm_first:
            x = x + self._self_block(self.norm1(x), self_mask, cache)
            out, weights = self._cross_block(self.norm2(x), memory_kv, need_weights)
            x = x + out
            x = x + self._ff_block(self.norm3(x))
        else:
            x = self.norm1(x + self._self_block(x, self_mask, cache))
            out, weights = self._cross_block(x, memory_kv, need_weights)
            x = self.norm2(x + out)
            x = self.norm3(x + self._ff_block(x))
        return x, weights


class TransformerDecoder(nn.Module):
    """A stack of ``DecoderLayer``s (plus a final LayerNorm for pre-norm stacks)."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        num_heads: int,
        feedforward_size: int,
        dropout: float = 0.1,
        norm_first: bool = False,
        final_norm: bool = True,
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(hidden_size, num_heads, feedforward_size, dropout, norm_first)
            for _ in range(num_layers)
        )
        # Pre-norm layers leave the residual stream un-normalised; the tied output layer
        # expects normalised features. (Post-norm stacks end in a LayerNorm already.) The
        # reference's pre-norm stack has none, so imported pre-norm models turn it off.
        self.final_norm = nn.LayerNorm(hidden_size) if norm_first and final_norm else nn.Identity()

    def memory_key_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values of each layer for memory (B, N, H); computed once per
        image and reused at every decoding step."""
        return [layer.cross_attn.project_key_value(memory) for layer in self.layers]

    def forward(
        self,
        x: torch.Tensor,
        memory_kv: list[tuple[torch.Tensor, torch.Tensor]],
        self_mask: torch.Tensor | None = None,
        caches: list[dict] | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """x: (B, L, H) -> (B, L, H), plus per-layer cross-attention weights if asked for."""
        all_weights = []
        for i, layer in enumerate(self.layers):
            cache = caches[i] if caches is not None else None
            x, w = layer(x, memory_kv[i], self_mask, cache, need_weights)
            if w is not None:
                all_weights.append(w)
        return self.final_norm(x), all_weights
