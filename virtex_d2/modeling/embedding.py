"""Word + learned positional embedding of caption tokens."""

from __future__ import annotations

import torch
from torch import nn


class WordAndPositionalEmbedding(nn.Module):
    """Sum of word and position embeddings, then LayerNorm and dropout.

    Args:
        vocab_size: number of tokens; ``padding_idx`` rows stay zero.
        hidden_size: embedding width H.
        max_caption_length: number of learned positions.
    """

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dropout: float = 0.1,
        max_caption_length: int = 30,
        padding_idx: int = 0,
    ):
        super().__init__()
        self.padding_idx = padding_idx
        self.words = nn.Embedding(vocab_size, hidden_size, padding_idx=padding_idx)
        self.positions = nn.Embedding(max_caption_length, hidden_size)
        # eps as in the reference implementation.
        self.layer_norm = nn.LayerNorm(hidden_size, eps=1e-8)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, start_position: int = 0) -> torch.Tensor:
        """tokens: (B, L) int64 -> (B, L, H). ``start_position`` offsets the positions when
        decoding incrementally (the tokens are positions start..start+L-1)."""
        length = tokens.shape[1]
        if start_position + length > self.positions.num_embeddings:
            raise ValueError(
                f"caption of {start_position + length} tokens exceeds the "
                f"{self.positions.num_embeddings} learned positions (MAX_CAPTION_LENGTH)"
            )
        positions = torch.arange(start_position, start_position + length, device=tokens.device)
        # shape: (B, L, H)
        x = self.words(tokens) + self.positions(positions).unsqueeze(0)
        x = self.dropout(self.layer_norm(x))
        # Padding positions become exact zeros, as in the reference implementation. Training
        # never reads them (they are masked as keys and ignored as targets), but a decoder may
        # generate id 0 mid-caption, and the reference then feeds a zero vector.
        return x * (tokens != self.padding_idx).unsqueeze(-1).to(x.dtype)
