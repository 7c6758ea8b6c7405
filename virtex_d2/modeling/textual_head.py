"""Textual heads: visual projection, token embedding, transformer(s) and the tied output layer.

Heads are registered in ``TEXTUAL_HEAD_REGISTRY`` and built from ``MODEL.VIRTEX.TEXTUAL_HEAD``.
"""

from __future__ import annotations

import torch
from detectron2.utils.registry import Registry
from torch import nn

from .embedding import WordAndPositionalEmbedding
from .transformer import TransformerDecoder

TEXTUAL_HEAD_REGISTRY = Registry("TEXTUAL_HEAD")
TEXTUAL_HEAD_REGISTRY.__doc__ = """
Textual heads of VirTex models. A head is called with ``(cfg, visual_channels,
num_directions)`` and must provide ``project_visual``, ``memory``, ``forward`` and ``logits``.
"""


def build_textual_head(cfg, visual_channels: int, num_directions: int) -> nn.Module:
    name = cfg.MODEL.VIRTEX.TEXTUAL_HEAD.NAME
    return TEXTUAL_HEAD_REGISTRY.get(name)(cfg, visual_channels, num_directions)


def causal_mask(length: int, device: torch.device) -> torch.Tensor:
    """(L, L) bool, True where query i may attend to key j (j <= i)."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


@TEXTUAL_HEAD_REGISTRY.register()
class TransformerTextualHead(nn.Module):
    """Transformer over caption tokens that cross-attends to the projected visual grid.

    ``num_directions`` = 2 builds a second transformer for right-to-left captioning that shares
    the visual projection, embedding and output layer with the first (bicaptioning).
    """

    def __init__(self, cfg, visual_channels: int, num_directions: int = 1):
        super().__init__()
        t = cfg.MODEL.VIRTEX.TEXTUAL_HEAD
        self.hidden_size = t.HIDDEN_SIZE
        self.vocab_size = cfg.MODEL.VIRTEX.VOCAB_SIZE
        self.visual_projection = nn.Linear(visual_channels, t.HIDDEN_SIZE)
        self.embedding = WordAndPositionalEmbedding(
            self.vocab_size, t.HIDDEN_SIZE, t.DROPOUT, cfg.MODEL.VIRTEX.MAX_CAPTION_LENGTH
        )

        def stack() -> TransformerDecoder:
            return TransformerDecoder(
                t.NUM_LAYERS,
                t.HIDDEN_SIZE,
                t.NUM_HEADS,
                t.FEEDFORWARD_SIZE,
                t.DROPOUT,
                t.NORM_FIRST,
                t.PRE_NORM_FINAL_NORM,
            )

        self.transformer = stack()
        self.backward_transformer = stack() if num_directions == 2 else None
        self.output = nn.Linear(t.HIDDEN_SIZE, self.vocab_size)
        if t.INIT_STD <= 0:
            raise ValueError(f"MODEL.VIRTEX.TEXTUAL_HEAD.INIT_STD must be > 0, got {t.INIT_STD}")
        self.apply(lambda m: self._init_weights(m, t.INIT_STD))
        # Tied after init so both names refer to the one (BERT-initialised) matrix.
        self.output.weight = self.embedding.words.weight

    @staticmethod
    def _init_weights(module: nn.Module, std: float) -> None:
        # BERT-style initialisation (std 0.02 in the reference implementation).
        if isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight.data.normal_(mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()

    def decoder(self, direction: int) -> TransformerDecoder:
        return self.transformer if direction == 0 else self.backward_transformer

    def project_visual(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, C, h, w) grid -> (B, h*w, H) visual tokens."""
        # shape: (B, h*w, C)
        grid = features.flatten(2).transpose(1, 2)
        return self.visual_projection(grid)

    def memory(self, visual: torch.Tensor, direction: int = 0):
        """Per-layer cross-attention keys/values of visual tokens (B, N, H)."""
        return self.decoder(direction).memory_key_values(visual)

    def forward(
        self,
        tokens: torch.Tensor,
        memory_kv,
        direction: int = 0,
        causal: bool = True,
        key_padding: torch.Tensor | None = None,
        caches: list[dict] | None = None,
        start_position: int = 0,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """tokens: (B, L) -> hidden states (B, L, H) and per-layer cross-attention weights.

        ``key_padding``: (B, L) bool, True at padding. With ``caches`` the tokens are the new
        positions ``start_position...`` and earlier keys/values come from the caches.
        """
        x = self.embedding(tokens, start_position)
        mask = self.attention_mask(
            tokens.shape[1], tokens.device, causal, key_padding, caches is not None, start_position
        )
        return self.decoder(direction)(x, memory_kv, mask, caches, need_weights)

    @staticmethod
    def attention_mask(
        length: int,
        device: torch.device,
        causal: bool = True,
        key_padding: torch.Tensor | None = None,
        cached: bool = False,
        start_position: int = 0,
    ) -> torch.Tensor | None:
        """Self-attention mask of ``length`` new positions (True = may attend), or None.

        ``key_padding``: (B, L) bool, True at padding; with it the mask is (B, 1, L, L).
        ``cached``: the keys also hold ``start_position`` earlier (cached) positions.
        """
        mask = None
        if causal and (not cached or length > 1):
            mask = causal_mask(length, device)
            if cached and start_position > 0:
                past = torch.ones(length, start_position, dtype=torch.bool, device=device)
                mask = torch.cat([past, mask], dim=1)
        if key_padding is not None:
            keep = ~key_padding[:, None, None, :]
            mask = keep if mask is None else mask[None, None] & keep
        return mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., vocab_size)."""
        return self.output(hidden)
