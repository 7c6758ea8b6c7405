"""The VirTex meta-architecture: a visual backbone trained by one of five pretraining tasks.

Detectron2 contract: ``forward(batched_inputs: list[dict])``; in training it returns a dict of
scalar losses, in eval a list of per-image predictions (``{"caption": str, "tokens": list}``
for the captioning tasks, ``{"scores": Tensor(K)}`` for the classification tasks).
Each input dict comes from ``CaptionDatasetMapper``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.structures import ImageList
from torch import nn
from torch.profiler import record_function

from ..config import CAPTIONING_TASKS, DECODERS, PRETRAINING_TASKS
from ..data.tokenizer import EOS_ID, PAD_ID, SOS_ID
from .decoding import beam_search, greedy_decode, nucleus_sample
from .reference_decoding import ban_last_token, reference_beam_search, reference_nucleus_sample
from .textual_head import build_textual_head

# torch.profiler ranges of the two directions' transformers (tools/benchmarks/profile_pretrain.py).
_DIRECTION_RANGES = ("virtex.forward_transformer", "virtex.backward_transformer")


def pad_tokens(seqs: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Right-pad variable-length token tensors with PAD_ID: -> (B, L_max)."""
    return nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD_ID).to(device)


def normalized_images(
    images: list[torch.Tensor],
    pixel_mean: torch.Tensor,
    pixel_std: torch.Tensor,
    channels_last: bool = False,
) -> torch.Tensor:
    """(3, H, W) images (any dtype, any device) -> one normalised float batch (B, 3, H', W') on
    ``pixel_mean``'s device, zero-padded to the largest size, channels-last if asked."""
    device = pixel_mean.device
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if all(im.shape == images[0].shape for im in images):
        # Equal crops (pretraining): one stacked batch, moved and normalised once, instead of a
        # normalised copy per image plus ImageList's padded copy of them all.
        dtype = torch.promote_types(images[0].dtype, pixel_mean.dtype)
        x = torch.stack(images).to(device, dtype, memory_format=layout)
        return x.sub_(pixel_mean).div_(pixel_std)
    normalized = [(im.to(device) - pixel_mean) / pixel_std for im in images]
    return ImageList.from_tensors(normalized, 0).tensor.contiguous(memory_format=layout)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy against a multi-hot target normalised to a distribution.

    logits, targets: (B, K). Rows without any target contribute zero.
    """
    dist = targets / targets.sum(dim=1, keepdim=True).clamp(min=1.0)
    return -(dist * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


@META_ARCH_REGISTRY.register()
class VirTex(nn.Module):
    """Visual backbone + task head. ``task`` is one of ``PRETRAINING_TASKS``."""

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        task: str,
        textual_head: nn.Module | None = None,
        classifier: nn.Module | None = None,
        pixel_mean: tuple[float, ...],
        pixel_std: tuple[float, ...],
        tokenizer=None,
        decoder: str = "beam",
        beam_size: int = 5,
        per_node_beam_size: int = 2,
        max_decode_length: int = 30,
        length_penalty: float = 0.0,
        top_p: float = 0.9,
        seed: int = 0,
        use_cache: bool = True,
        channels_last: bool = False,
    ):
        super().__init__()
        if task not in PRETRAINING_TASKS:
            raise ValueError(f"MODEL.VIRTEX.TASK must be one of {PRETRAINING_TASKS}, got {task!r}")
        if decoder not in DECODERS:
            raise ValueError(
                f"MODEL.VIRTEX.DECODER.NAME must be one of {DECODERS}, got {decoder!r}"
            )
        self.backbone = backbone
        self.task = task
        self.textual_head = textual_head
        self.classifier = classifier
        self.tokenizer = tokenizer
        self.decoder, self.beam_size, self.max_decode_length = decoder, beam_size, max_decode_length
        self.per_node_beam_size = per_node_beam_size
        self.length_penalty, self.top_p, self.seed = length_penalty, top_p, seed
        self.use_cache = use_cache
        # Only the activations: channels-last conv weights would make the fused SGD kernel
        # copy them to NCHW and back at every step (and would be saved in that layout).
        self.channels_last = channels_last
        # Bicaptioning computes the embedding, output layer and loss of both directions in one
        # call each; False runs ``caption_loss`` per direction (the same numbers, for checks).
        self.batched_bicaptioning = True
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg) -> dict:
        from ..data.vocabulary import resolve_tokenizer

        v = cfg.MODEL.VIRTEX
        backbone = build_backbone(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        out = backbone.output_shape()
        if list(out) != ["res5"] and len(out) != 1:
            raise ValueError(
                "VirTex uses one visual grid; set MODEL.RESNETS.OUT_FEATURES "
                f"['res5'], got {list(out)}"
            )
        channels = next(iter(out.values())).channels
        args = {
            "backbone": backbone,
            "task": v.TASK,
            "pixel_mean": tuple(cfg.MODEL.PIXEL_MEAN),
            "pixel_std": tuple(cfg.MODEL.PIXEL_STD),
            "decoder": v.DECODER.NAME,
            "beam_size": v.DECODER.BEAM_SIZE,
            "per_node_beam_size": v.DECODER.PER_NODE_BEAM_SIZE,
            "max_decode_length": min(v.DECODER.MAX_LENGTH, v.MAX_CAPTION_LENGTH),
            "length_penalty": v.DECODER.LENGTH_PENALTY,
            "top_p": v.DECODER.TOP_P,
            "seed": v.DECODER.SEED,
            "use_cache": v.DECODER.USE_CACHE,
            "channels_last": v.CHANNELS_LAST,
        }
        if v.TASK in (*CAPTIONING_TASKS, "masked_lm"):
            args["textual_head"] = build_textual_head(
                cfg, channels, num_directions=2 if v.TASK == "bicaptioning" else 1
            )
            # Needed to turn generated ids into text (and checks VOCAB_SIZE against it).
            args["tokenizer"] = resolve_tokenizer(cfg)
        elif v.TASK == "token_classification":
            args["classifier"] = nn.Linear(channels, v.VOCAB_SIZE)
        else:
            # Index 0 is reserved (never a target), as in the reference's 2048 -> 81 layer.
            args["classifier"] = nn.Linear(channels, v.NUM_MULTILABEL_CLASSES + 1)
        return args

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def visual_features(self, batched_inputs: list[dict]) -> torch.Tensor:
        """Normalised images -> the backbone's last grid (B, C, h, w)."""
        x = normalized_images(
            [x["image"] for x in batched_inputs],
            self.pixel_mean,
            self.pixel_std,
            self.channels_last,
        )
        with record_function("virtex.backbone"):
            features = self.backbone(x)
        return next(iter(features.values()))

    def forward(self, batched_inputs: list[dict]):
        features = self.visual_features(batched_inputs)
        if self.training:
            return self.losses(features, batched_inputs)
        return self.inference(features, batched_inputs)

    # ----------------------------------------------------------------------------- training
    def caption_loss(self, visual, tokens: torch.Tensor, direction: int) -> torch.Tensor:
        """Next-token cross-entropy; tokens (B, L) with [SOS] first. Logits are computed only
        at non-padding targets (the 10K-way output layer dominates the head's cost)."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with record_function(_DIRECTION_RANGES[direction]):
            memory = self.textual_head.memory(visual, direction)
            hidden, _ = self.textual_head(
                inputs, memory, direction, causal=True, key_padding=inputs == PAD_ID
            )
        keep = targets != PAD_ID
        with record_function("virtex.output_layer"):
            logits = self.textual_head.logits(hidden[keep])
        with record_function("virtex.loss"):
            return F.cross_entropy(logits, targets[keep])

    def bicaption_losses(self, visual, tokens: torch.Tensor, back: torch.Tensor) -> dict:
        """``caption_loss`` of both directions (tokens, back: (B, L), the same lengths), with
        what they share done once: the embedding lookup and the output layer run on both
        directions' tokens at once (one product with the 10K x H matrix, and two dense
        gradients of it to sum instead of four). The transformers have separate weights and
        run in turn:
        batching them would mean stacking their weights every step, and on a CPU the
        products are large enough already. Equal to ``caption_loss`` up to float rounding."""
        head = self.textual_head
        b = tokens.shape[0]
        inputs = torch.cat([tokens[:, :-1], back[:, :-1]])
        targets = torch.cat([tokens[:, 1:], back[:, 1:]])
        with record_function("virtex.embedding"):
            x = head.embedding(inputs)
        padding = inputs == PAD_ID
        hidden = []
        for direction, (x_dir, pad_dir) in enumerate(zip(x.split(b), padding.split(b))):
            with record_function(_DIRECTION_RANGES[direction]):
                memory = head.memory(visual, direction)
                mask = head.attention_mask(inputs.shape[1], inputs.device, True, pad_dir)
                hidden.append(head.decoder(direction)(x_dir, memory, mask)[0])
        hidden = torch.cat(hidden)
        keep = targets != PAD_ID
        n_forward = int(keep[:b].sum())
        with record_function("virtex.output_layer"):
            logits = head.logits(hidden[keep])
        targets = targets[keep]
        with record_function("virtex.loss"):
            # Separate calls keep each direction's mean exactly as caption_loss computes it.
            return {
                "loss_caption_forward": F.cross_entropy(logits[:n_forward], targets[:n_forward]),
                "loss_caption_backward": F.cross_entropy(logits[n_forward:], targets[n_forward:]),
            }

    def losses(self, features: torch.Tensor, batched_inputs: list[dict]) -> dict:
        device = self.device
        if self.task in CAPTIONING_TASKS:
            with record_function("virtex.visual_projection"):
                visual = self.textual_head.project_visual(features)
            tokens = pad_tokens([x["caption_tokens"] for x in batched_inputs], device)
            if self.task == "bicaptioning":
                back = pad_tokens([x["noitpac_tokens"] for x in batched_inputs], device)
                if self.batched_bicaptioning and back.shape == tokens.shape:
                    return self.bicaption_losses(visual, tokens, back)
                return {
                    "loss_caption_forward": self.caption_loss(visual, tokens, 0),
                    "loss_caption_backward": self.caption_loss(visual, back, 1),
                }
            return {"loss_caption_forward": self.caption_loss(visual, tokens, 0)}
        if self.task == "masked_lm":
            visual = self.textual_head.project_visual(features)
            tokens = pad_tokens([x["masked_tokens"] for x in batched_inputs], device)
            labels = pad_tokens([x["mlm_labels"] for x in batched_inputs], device)
            memory = self.textual_head.memory(visual, 0)
            hidden, _ = self.textual_head(
                tokens, memory, 0, causal=False, key_padding=tokens == PAD_ID
            )
            keep = labels != PAD_ID
            logits = self.textual_head.logits(hidden[keep])
            return {"loss_masked_lm": F.cross_entropy(logits, labels[keep])}
        pooled = features.mean(dim=(2, 3))
        logits = self.classifier(pooled)
        key = "token_bag" if self.task == "token_classification" else "labels"
        targets = torch.zeros_like(logits)
        for i, x in enumerate(batched_inputs):
            idx = x[key].to(device)
            if key == "labels":
                idx = idx + 1  # shift past the reserved index 0
            targets[i, idx] = 1.0
        return {f"loss_{self.task}": soft_target_cross_entropy(logits, targets)}

    # ---------------------------------------------------------------------------- inference
    def inference(self, features: torch.Tensor, batched_inputs: list[dict]) -> list[dict]:
        if self.task in CAPTIONING_TASKS:
            token_lists = self.generate(features)
            return [{"caption": self.tokenizer.decode(t), "tokens": t} for t in token_lists]
        if self.task == "masked_lm":
            # A bidirectional model cannot generate captions; nothing to predict per image.
            return [{} for _ in batched_inputs]
        scores = self.classifier(features.mean(dim=(2, 3))).softmax(dim=1)
        if self.task == "multilabel_classification":
            scores = scores[:, 1:]
        return [{"scores": s} for s in scores]

    def make_step(self, visual: torch.Tensor, use_cache: bool):
        """Step and reorder functions for the decoders over visual tokens (N, n_grid, H).

        With ``use_cache`` only the newest token is fed and earlier keys/values are reused;
        otherwise the whole prefix is recomputed every step (the reference behaviour).
        """
        head = self.textual_head
        memory = head.memory(visual, 0)
        caches = [dict() for _ in memory] if use_cache else None

        def step(tokens: torch.Tensor) -> torch.Tensor:
            if use_cache:
                t = tokens.shape[1] - 1
                hidden, _ = head(tokens[:, -1:], memory, 0, caches=caches, start_position=t)
            else:
                hidden, _ = head(tokens, memory, 0, causal=True)
            return F.log_softmax(head.logits(hidden[:, -1]).float(), dim=-1)

        def reorder(rows: torch.Tensor) -> None:
            if caches is not None:
                for c in caches:
                    c["k"], c["v"] = c["k"][rows], c["v"][rows]

        return step, reorder

    @torch.no_grad()
    def generate(
        self, features: torch.Tensor, decoder: str | None = None, use_cache: bool | None = None
    ) -> list[list[int]]:
        """Captions (token ids without [SOS]/[EOS]) for a grid (B, C, h, w), left to right."""
        decoder = decoder or self.decoder
        use_cache = self.use_cache if use_cache is None else use_cache
        visual = self.textual_head.project_visual(features)
        b = visual.shape[0]
        common = dict(
            sos=SOS_ID, eos=EOS_ID, max_length=self.max_decode_length, device=visual.device
        )
        if decoder == "beam":
            visual = visual.repeat_interleave(self.beam_size, dim=0)
            step, reorder = self.make_step(visual, use_cache)
            tokens, _ = beam_search(
                step, reorder, b, self.beam_size, length_penalty=self.length_penalty, **common
            )
            return tokens
        if decoder == "reference_beam":
            return self._reference_beam(visual, use_cache)
        step, _ = self.make_step(visual, use_cache)
        gen = torch.Generator(device=visual.device).manual_seed(self.seed)
        if decoder == "reference_nucleus":
            return reference_nucleus_sample(
                lambda prefix: ban_last_token(step(prefix), prefix),
                b,
                SOS_ID,
                EOS_ID,
                self.max_decode_length,
                visual.device,
                top_p=self.top_p,
                generator=gen,
            )
        if decoder == "greedy":
            return greedy_decode(step, b, **common)
        return nucleus_sample(step, b, top_p=self.top_p, generator=gen, **common)

    def _reference_beam(self, visual: torch.Tensor, use_cache: bool) -> list[list[int]]:
        """The reference's beam search over visual tokens (B, n_grid, H); see
        ``reference_decoding``. Its first step sees [SOS]; later steps see the generated
        tokens alone (no [SOS]) at positions 0.., so the cache starts empty at step two."""
        head = self.textual_head
        b = visual.shape[0]
        sos = torch.full((b, 1), SOS_ID, dtype=torch.long, device=visual.device)

        def first_step() -> torch.Tensor:
            hidden, _ = head(sos, head.memory(visual, 0), 0, causal=True)
            return ban_last_token(F.log_softmax(head.logits(hidden[:, -1]).float(), dim=-1), sos)

        step, reorder = self.make_step(visual.repeat_interleave(self.beam_size, dim=0), use_cache)
        tokens, _ = reference_beam_search(
            first_step,
            lambda prefix: ban_last_token(step(prefix), prefix),
            reorder,
            b,
            self.beam_size,
            EOS_ID,
            self.max_decode_length,
            self.per_node_beam_size,
        )
        return tokens
