"""A pretraining step the way the reference VirTex code (kdexd/virtex) takes it, for speed
comparisons only (tools/benchmarks/benchmark_pretrain.py, step (c')).

What it copies from the reference, from reading ``virtex/models/captioning.py``,
``virtex/modules/textual_heads.py``, ``virtex/modules/visual_backbones.py``,
``virtex/optim/lookahead.py``, ``virtex/factories.py`` and ``scripts/pretrain_virtex.py``:

- a torchvision ResNet (``zero_init_residual=True``, NCHW) up to its last stage;
- per direction a textual head: visual projection, word + position embedding, PyTorch's
  post-norm ``nn.TransformerDecoder`` (sequence-first, float ``-inf`` future mask, padding mask),
  output layer tied to the word embedding; the backward head is a deep copy sharing the
  projection, embedding and output layer with the forward one, and runs its own forward pass
  (so the visual projection is computed twice);
- logits at every position of the whole caption ([EOS] included), then
  ``CrossEntropyLoss(ignore_index=PAD)`` on all but the last;
- SGD with one parameter group per parameter (two learning rates, no decay for the textual
  norms and biases) in its default kernels, wrapped in the reference's Lookahead loop;
  ``clip_grad_norm_(model.parameters())`` before the step.

Same sizes as the VirTex config it is built from; the weights are random.
"""

from __future__ import annotations

import copy
import re
import warnings

import torch
import torchvision
from torch import nn

from virtex_d2.data.tokenizer import PAD_ID
from virtex_d2.modeling.embedding import WordAndPositionalEmbedding

# PyTorch deprecates the reference's mix of a float future mask and a bool padding mask; it
# still runs, and warns at every call.
warnings.filterwarnings("ignore", message=".*mismatched key_padding_mask and attn_mask.*")

# The reference's no-decay rule: norms and biases of the textual stream.
NO_DECAY = r".*textual.(embedding|transformer).*(norm.*|bias)"


class ReferenceTextualHead(nn.Module):
    def __init__(
        self,
        visual_channels: int,
        vocab_size: int,
        hidden: int,
        layers: int,
        heads: int,
        feedforward: int,
        dropout: float,
        max_length: int,
    ):
        super().__init__()
        self.vocab_size = vocab_size
        self.visual_projection = nn.Linear(visual_channels, hidden)
        self.embedding = WordAndPositionalEmbedding(vocab_size, hidden, dropout, max_length)
        layer = nn.TransformerDecoderLayer(
            hidden, heads, dim_feedforward=feedforward, dropout=dropout, activation="gelu"
        )
        self.transformer = nn.TransformerDecoder(layer, layers)
        self.output = nn.Linear(hidden, vocab_size)
        self.output.weight = self.embedding.words.weight

    def forward(
        self, features: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        b, c = features.shape[:2]
        visual = self.visual_projection(features.view(b, c, -1).permute(0, 2, 1))
        length = tokens.shape[1]
        padding = lengths.unsqueeze(1) < torch.ones_like(tokens).cumsum(dim=1)
        x = self.embedding(tokens)
        future = torch.triu(torch.ones(length, length, dtype=x.dtype, device=x.device), 1)
        future = future.masked_fill(future == 1, float("-inf"))
        out = self.transformer(
            x.transpose(0, 1), visual.transpose(0, 1), tgt_mask=future, tgt_key_padding_mask=padding
        )
        return self.output(out.transpose(0, 1))


class ReferenceBicaptioning(nn.Module):
    """Called like VirTex in training: list of mapped dicts -> dict of the two losses."""

    def __init__(self, cfg):
        super().__init__()
        r, v, t = cfg.MODEL.RESNETS, cfg.MODEL.VIRTEX, cfg.MODEL.VIRTEX.TEXTUAL_HEAD
        wide = "wide_" if r.WIDTH_PER_GROUP == 128 else ""
        name = f"{wide}resnet{r.DEPTH}" + ("_2" if wide else "")
        cnn = getattr(torchvision.models, name)(weights=None, zero_init_residual=True)
        channels = cnn.fc.in_features
        self.cnn = nn.Sequential(*list(cnn.children())[:-2])
        self.textual = ReferenceTextualHead(
            channels,
            v.VOCAB_SIZE,
            t.HIDDEN_SIZE,
            t.NUM_LAYERS,
            t.NUM_HEADS,
            t.FEEDFORWARD_SIZE,
            t.DROPOUT,
            v.MAX_CAPTION_LENGTH,
        )
        self.backward_textual = copy.deepcopy(self.textual)
        self.backward_textual.visual_projection = self.textual.visual_projection
        self.backward_textual.embedding = self.textual.embedding
        self.backward_textual.output = self.textual.output
        self.loss = nn.CrossEntropyLoss(ignore_index=PAD_ID)
        self.register_buffer("pixel_mean", torch.tensor(cfg.MODEL.PIXEL_MEAN).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(cfg.MODEL.PIXEL_STD).view(-1, 1, 1), False)

    def forward(self, batch: list[dict]) -> dict:
        device = self.pixel_mean.device
        # The reference normalises in its data loader; done here so the step gets the same
        # uint8 crops as VirTex's.
        images = torch.stack([x["image"] for x in batch]).to(device).float()
        features = self.cnn((images - self.pixel_mean) / self.pixel_std)
        pad = nn.utils.rnn.pad_sequence
        tokens = pad([x["caption_tokens"] for x in batch], batch_first=True).to(device)
        back = pad([x["noitpac_tokens"] for x in batch], batch_first=True).to(device)
        lengths = torch.tensor([len(x["caption_tokens"]) for x in batch], device=device)
        losses = {}
        for key, head, toks in (
            ("loss_caption_forward", self.textual, tokens),
            ("loss_caption_backward", self.backward_textual, back),
        ):
            logits = head(features, toks, lengths)
            losses[key] = self.loss(
                logits[:, :-1].contiguous().view(-1, head.vocab_size),
                toks[:, 1:].contiguous().view(-1),
            )
        return losses


class ReferenceLookahead:
    """The reference's Lookahead around an optimizer: a Python loop over every parameter."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5):
        self.optimizer, self.k, self.alpha = optimizer, k, alpha
        self.counter = 0
        self.slow = {p: p.detach().clone() for g in optimizer.param_groups for p in g["params"]}

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups  # GradScaler reads them

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()

    def step(self) -> None:
        self.optimizer.step()
        self.counter += 1
        if self.counter >= self.k:
            self.counter = 0
            with torch.no_grad():
                for p, slow in self.slow.items():
                    p.mul_(self.alpha).add_(slow, alpha=1.0 - self.alpha)
                    slow.copy_(p)


def build_reference(cfg) -> tuple[nn.Module, ReferenceLookahead]:
    """The reference-style model and optimizer for a VirTex config (on cfg.MODEL.DEVICE)."""
    model = ReferenceBicaptioning(cfg).to(cfg.MODEL.DEVICE)
    s = cfg.SOLVER
    groups = []
    for name, param in model.named_parameters():
        wd = 0.0 if re.match(NO_DECAY, name) else s.WEIGHT_DECAY
        lr = s.BASE_LR if name.startswith("cnn") else s.VIRTEX.TEXTUAL_LR
        groups.append({"params": [param], "lr": lr, "weight_decay": wd})
    sgd = torch.optim.SGD(groups, lr=s.BASE_LR, momentum=s.MOMENTUM)
    la = s.VIRTEX.LOOKAHEAD
    return model, ReferenceLookahead(sgd, la.STEPS if la.ENABLED else 1 << 30, la.ALPHA)


def reference_step(
    model: nn.Module,
    optimizer: ReferenceLookahead,
    batch: list[dict],
    clip: float,
    amp: bool = False,
    scaler=None,
) -> None:
    """One iteration of the reference's training loop (scripts/pretrain_virtex.py)."""
    optimizer.zero_grad()
    with torch.autocast("cuda", enabled=amp):
        loss = sum(model(batch).values())
    if scaler is None:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    scaler.step(optimizer)
    scaler.update()
