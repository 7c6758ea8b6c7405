"""Builders for reference-implementation checkpoints in tests (not a test module).

``rebuild_parity_checkpoint`` follows the recipe of ``shared/reference-parity/README.md`` (weights
from names, shapes and per-name seeds). ``reference_style_state_dict`` lays out a reference
checkpoint of any shape from the module names the reference uses (torchvision ResNet under
``visual.cnn.``, PyTorch's ``nn.TransformerDecoderLayer`` under ``textual.transformer.``), for
the import cases the fixture does not cover.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
import torchvision
from helpers import SHARED
from torch import nn

PARITY = SHARED / "reference-parity"


def _recipe_tensor(name: str, shape: list[int], dtype: str) -> torch.Tensor:
    seed = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16)
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(shape, generator=g)
    n = torch.randn(shape, generator=g)
    if dtype == "int64":
        return torch.zeros(shape, dtype=torch.int64)
    if name.endswith("running_var"):
        return 0.5 + u
    if name.endswith("running_mean"):
        return 0.1 * n
    if len(shape) == 1:
        return 0.5 + u if name.endswith("weight") else 0.1 * n
    if "embedding" in name:
        return 0.5 * n
    return n * math.sqrt(2.0 / math.prod(shape[1:]))


def rebuild_parity_checkpoint(path: Path) -> Path:
    """Write ``{"model": state_dict}`` of the parity fixture's reference model to ``path``."""
    names = json.loads((PARITY / "state_dict_names_shapes.json").read_text())
    expected = json.loads((PARITY / "expected.json").read_text())
    state = {name: _recipe_tensor(name, shape, dtype) for name, shape, dtype in names}
    for group in expected["tied_parameters"]:
        source = sorted(group)[0]
        for name in group:
            state[name] = state[source]
    torch.save({"model": state}, path)
    return path


class ReferenceStyleHead(nn.Module):
    """The reference's textual head, written with the same module names (test oracle)."""

    def __init__(
        self,
        visual: int,
        vocab: int,
        hidden: int,
        layers: int,
        heads: int,
        ffn: int,
        prenorm: bool,
        max_length: int = 30,
    ):
        super().__init__()
        self.visual_projection = nn.Linear(visual, hidden)
        self.embedding = nn.Module()
        self.embedding.words = nn.Embedding(vocab, hidden, padding_idx=0)
        self.embedding.positions = nn.Embedding(max_length, hidden)
        self.embedding.layer_norm = nn.LayerNorm(hidden, eps=1e-8)
        layer = nn.TransformerDecoderLayer(
            hidden, heads, ffn, 0.1, activation="gelu", norm_first=prenorm
        )
        self.transformer = nn.TransformerDecoder(layer, layers)
        self.output = nn.Linear(hidden, vocab)
        self.output.weight = self.embedding.words.weight

    def forward(self, grid: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """grid (B, C, h, w), tokens (B, L) -> logits (B, L, V), causal, padding 0."""
        b, length = tokens.shape
        visual = self.visual_projection(grid.flatten(2).transpose(1, 2))
        e = self.embedding
        x = e.layer_norm(e.words(tokens) + e.positions(torch.arange(length))[None])
        x = x * (tokens != 0)[..., None].float()
        future = torch.full((length, length), float("-inf")).triu(1)
        h = self.transformer(
            x.transpose(0, 1),
            visual.transpose(0, 1),
            tgt_mask=future,
            tgt_key_padding_mask=tokens == 0,
        )
        return self.output(h.transpose(0, 1))


def reference_style_state_dict(
    arch: str,
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    prenorm: bool,
    bicaptioning: bool,
    seed: int = 0,
):
    """(state_dict, cnn, forward head) of a randomly initialised reference-layout model."""
    torch.manual_seed(seed)
    cnn = getattr(torchvision.models, arch)()
    cnn.fc = nn.Identity()
    cnn.avgpool = nn.Identity()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong mapping shows
        for m in cnn.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    visual = cnn.layer4[-1].conv3.out_channels if hasattr(cnn.layer4[-1], "conv3") else 512
    forward = ReferenceStyleHead(visual, vocab, hidden, layers, heads, ffn, prenorm)
    state = {f"visual.cnn.{k}": v for k, v in cnn.state_dict().items()}
    state.update({f"textual.{k}": v for k, v in forward.state_dict().items()})
    if bicaptioning:
        backward = ReferenceStyleHead(visual, vocab, hidden, layers, heads, ffn, prenorm)
        for k, v in backward.state_dict().items():
            shared = not k.startswith("transformer.")
            state[f"backward_textual.{k}"] = state[f"textual.{k}"] if shared else v
    return state, cnn.eval(), forward.eval()
