"""Per-token cross-attention maps of the forward textual head: where it looked for each token.

The head is re-run once over ``[SOS] + tokens`` with teacher forcing. Because self-attention is
causal, the cross-attention weights at position ``i`` are exactly those used when the decoder
predicted token ``i + 1`` during generation. Weights (per layer: heads x tokens x grid cells)
are combined by taking the **mean over heads, then the mean over layers** (or one chosen
layer). Every map is a distribution over the ``h x w`` grid (sums to 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..data.tokenizer import SOS_ID


def check_layer(layer: int | None, num_layers: int) -> None:
    """Raise ValueError unless ``layer`` is None or indexes one of ``num_layers`` layers."""
    if layer is not None and not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} does not exist: the textual head has {num_layers} layer(s); "
            f"use 0..{num_layers - 1} (or -1 for the last)"
        )


def combine_attention(weights: Sequence[torch.Tensor], layer: int | None = None) -> torch.Tensor:
    """Per-layer cross-attention (B, heads, L, N) -> (B, L, N): the mean over heads, then the
    mean over layers; with ``layer`` (0-based, negative counts from the end) only that layer."""
    if not weights:
        raise ValueError("no attention weights: was the head called with need_weights=True?")
    check_layer(layer, len(weights))
    if layer is None:
        return torch.stack([w.float().mean(dim=1) for w in weights]).mean(dim=0)
    return weights[layer].float().mean(dim=1)


@torch.no_grad()
def token_attention_maps(
    head: nn.Module, features: torch.Tensor, tokens: Sequence[int], layer: int | None = None
) -> torch.Tensor:
    """(T, h, w) maps for one image's grid ``features`` (1, C, h, w) and its caption ``tokens``
    (no [SOS]/[EOS]); map t is the attention the forward head used to predict ``tokens[t]``."""
    check_layer(layer, len(head.decoder(0).layers))
    h, w = features.shape[-2:]
    if not tokens:  # the decoder emitted [EOS] first: nothing was predicted
        return torch.zeros(0, h, w)
    memory = head.memory(head.project_visual(features), 0)
    inputs = torch.tensor([[SOS_ID, *tokens[:-1]]], device=features.device)
    _, weights = head(inputs, memory, 0, causal=True, need_weights=True)
    return combine_attention(weights, layer)[0].reshape(len(tokens), h, w).cpu()
