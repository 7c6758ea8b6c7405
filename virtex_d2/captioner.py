"""Captioning arbitrary image files with a VirTex model, and per-word cross-attention maps.

Shared by ``tools/caption_images.py`` and ``tools/visualize_attention.py``.

Images are read by :func:`virtex_d2.data.image_io.load_image_rgb` (its docstring states the
policy); unreadable files are logged (one warning each) and listed under ``skipped``.

Images then go through the evaluation augmentations of the config (resize the shorter side to
``INPUT.VIRTEX.TEST_RESIZE``, centre crop ``TEST_CROP_SIZE``), exactly as in evaluation.

Attention maps (:func:`caption_attention`): the caption is generated, then the forward textual
head is re-run once over ``[SOS] + tokens`` with teacher forcing. Because self-attention is
causal, the cross-attention weights at position ``i`` are exactly those used when the decoder
predicted token ``i + 1``. Weights (per layer: heads x tokens x grid cells) are combined by
taking the **mean over heads, then the mean over layers** (or one chosen layer); a word made of
several sub-word tokens gets the mean of its tokens' maps. Every map is a distribution over the
``h x w`` grid (sums to 1). ``tools/visualize_attention.py`` draws them.
"""
from __future__ import annotations

import argparse
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from torch import nn
from tqdm import tqdm

from .config import CAPTIONING_TASKS, DECODERS
from .data.image_io import (  # noqa: F401  (re-exported for the tools)
    IMAGE_EXTENSIONS,
    UnreadableImageError,
    list_image_files,
    load_image_rgb,
)
from .data.tokenizer import SOS_ID, SPECIAL_TOKENS, CaptionTokenizer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- inputs
def eval_image_tensor(image: np.ndarray, augmentations: Sequence[T.Augmentation]) -> torch.Tensor:
    """(H, W, 3) uint8 -> the model's (3, S, S) uint8 input after the eval augmentations."""
    aug_input = T.AugInput(image)
    T.AugmentationList(list(augmentations))(aug_input)
    return torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))


# ------------------------------------------------------------------------------------ models
def model_load_errors() -> tuple[type[BaseException], ...]:
    """What building a captioning model from a config and weights raises for bad input (a
    missing file, a bad config, weights that do not fit or need unpickling): the tools report
    these in one line instead of a traceback."""
    from .engine.checkpoint import UnsafeCheckpointError, WeightsMismatchError

    return (FileNotFoundError, ValueError, WeightsMismatchError, UnsafeCheckpointError)


def load_config(config_file: str, opts: Sequence[str] = ()) -> CfgNode:
    """A frozen VirTex config: defaults, then ``config_file``, then ``KEY VALUE`` overrides
    (:func:`virtex_d2.config.setup_cfg`)."""
    from .config import setup_cfg

    return setup_cfg(config_file, list(opts))


def build_caption_model(cfg: CfgNode, weights: str) -> nn.Module:
    """Build the VirTex model of ``cfg``, load ``weights``, eval mode.

    Loaded by the project's one checkpointer (weights only unless ``MODEL.ALLOW_PICKLE_WEIGHTS``;
    every parameter required: a checkpoint without the textual head is an error naming it).
    """
    from .engine.checkpoint import build_checkpointer

    task = cfg.MODEL.VIRTEX.TASK
    if task not in CAPTIONING_TASKS:
        raise ValueError(
            f"MODEL.VIRTEX.TASK is {task!r}: only {'/'.join(CAPTIONING_TASKS)} models generate "
            "captions; pass the config the checkpoint was trained with"
        )
    if cfg.INPUT.FORMAT != "RGB":
        # Images are loaded as RGB here; VirTex's PIXEL_MEAN/STD are in RGB order.
        raise ValueError(f"INPUT.FORMAT must be 'RGB' for VirTex models, got {cfg.INPUT.FORMAT!r}")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights} does not exist")
    model = build_model(cfg)
    build_checkpointer(cfg, model, eval_only=True).load(weights)
    return model.eval()


@torch.no_grad()
def caption_tensors(
    model: nn.Module, images: Sequence[torch.Tensor], decoder: Optional[str] = None
) -> list[list[int]]:
    """Token ids (no [SOS]/[EOS]) for a batch of (3, S, S) uint8 RGB images of equal size."""
    _check_decoder(decoder)
    features = model.visual_features([{"image": im} for im in images])
    return model.generate(features, decoder=decoder)


def _check_decoder(decoder: Optional[str]) -> None:
    if decoder is not None and decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} or None, got {decoder!r}")


@dataclass
class CaptionResults:
    """Output of :func:`caption_files`; ``to_json`` gives the tools' json layout."""

    captions: list[dict] = field(default_factory=list)  # {"file_name", "caption"}
    skipped: list[dict] = field(default_factory=list)  # {"file_name", "error"}

    def to_json(self) -> dict:
        return {
            "captions": self.captions,
            "skipped": self.skipped,
            "num_captioned": len(self.captions),
            "num_skipped": len(self.skipped),
        }


def _prepared_batches(
    files: Sequence[str], augmentations, batch_size: int, num_workers: int
) -> Iterator[list[tuple[str, Union[torch.Tensor, UnreadableImageError]]]]:
    """Yield batches of (path, model input or the load error). With ``num_workers`` > 0 the
    next batch is decoded in threads while the caller runs the model (Pillow releases the GIL
    while decoding); at most two batches are held in memory."""

    def prepare(path: str):
        try:
            image = load_image_rgb(path)
        except UnreadableImageError as e:
            return e
        return eval_image_tensor(image, augmentations)

    chunks = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if num_workers <= 0:
        for chunk in chunks:
            yield [(p, prepare(p)) for p in chunk]
        return
    with ThreadPoolExecutor(num_workers) as pool:
        pending = [pool.submit(prepare, p) for p in chunks[0]] if chunks else []
        for i, chunk in enumerate(chunks):
            ready = [f.result() for f in pending]
            nxt = chunks[i + 1] if i + 1 < len(chunks) else []
            pending = [pool.submit(prepare, p) for p in nxt]
            yield list(zip(chunk, ready))


def caption_files(
    model: nn.Module,
    files: Sequence[str],
    augmentations: Sequence[T.Augmentation],
    *,
    batch_size: int = 16,
    decoder: Optional[str] = None,
    num_workers: int = 4,
    progress: bool = True,
) -> CaptionResults:
    """Caption ``files`` in order, ``batch_size`` images per forward pass.

    Unreadable files are logged (one warning each, with the reason) and listed in ``skipped``.
    With nucleus sampling the sampled captions depend on how images are batched.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    results = CaptionResults()
    bar = tqdm(total=len(files), unit="img", desc="captioning", disable=not progress)
    with bar:
        for batch in _prepared_batches(files, augmentations, batch_size, num_workers):
            good = []
            for path, item in batch:
                if isinstance(item, UnreadableImageError):
                    logger.warning("skipped %s: %s", path, item.reason)
                    results.skipped.append({"file_name": path, "error": item.reason})
                else:
                    good.append((path, item))
            if good:
                tokens = caption_tensors(model, [t for _, t in good], decoder)
                for (path, _), ids in zip(good, tokens):
                    caption = model.tokenizer.decode(ids)
                    results.captions.append({"file_name": path, "caption": caption})
            bar.update(len(batch))
    return results


# --------------------------------------------------------------------------------- attention
def word_spans(tokenizer: CaptionTokenizer, tokens: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Group a caption's token ids into words: [(word, positions in ``tokens``), ...].

    A piece starting with "▁" (Metaspace) begins a word; other pieces continue it. Special ids
    are dropped (decoding drops them too), and a bare "▁" piece joins the following word, so
    the words equal ``tokenizer.decode(tokens).split()``.
    """
    groups: list[list[int]] = []
    for pos, tok in enumerate(tokens):
        if int(tok) < len(SPECIAL_TOKENS):
            continue
        if not groups or tokenizer.id_to_token(tok).startswith("▁"):
            groups.append([pos])
        else:
            groups[-1].append(pos)
    spans: list[tuple[str, list[int]]] = []
    carry: list[int] = []
    for group in groups:
        positions = carry + group
        word = tokenizer.decode([tokens[p] for p in positions]).strip()
        if word:
            spans.append((word, positions))
            carry = []
        else:  # a bare "▁": its text (and attention) belong to the next word
            carry = positions
    return spans


def _check_layer(layer: Optional[int], num_layers: int) -> None:
    if layer is not None and not -num_layers <= layer < num_layers:
        raise ValueError(
            f"layer {layer} does not exist: the textual head has {num_layers} layer(s); "
            f"use 0..{num_layers - 1} (or -1 for the last)"
        )


def combine_attention(weights: Sequence[torch.Tensor], layer: Optional[int] = None) -> torch.Tensor:
    """Per-layer cross-attention (B, heads, L, N) -> (B, L, N): the mean over heads, then the
    mean over layers; with ``layer`` (0-based, negative counts from the end) only that layer."""
    if not weights:
        raise ValueError("no attention weights: was the head called with need_weights=True?")
    _check_layer(layer, len(weights))
    if layer is None:
        return torch.stack([w.float().mean(dim=1) for w in weights]).mean(dim=0)
    return weights[layer].float().mean(dim=1)


@dataclass
class CaptionAttention:
    """A caption and where the decoder looked while writing it.

    ``token_maps``: (T, h, w), map t was used to predict ``tokens[t]``;
    ``word_maps``: (num_words, h, w), mean of each word's token maps. Each map sums to 1.
    """

    caption: str
    tokens: list[int]
    words: list[str]
    token_maps: torch.Tensor
    word_maps: torch.Tensor


@torch.no_grad()
def caption_attention(
    model: nn.Module,
    image: torch.Tensor,
    tokens: Optional[Sequence[int]] = None,
    decoder: Optional[str] = None,
    layer: Optional[int] = None,
) -> CaptionAttention:
    """Caption one (3, S, S) uint8 image (or use the given ``tokens``) and return its attention.

    The forward (left-to-right) textual head is used, the one that generates captions.
    """
    head = model.textual_head
    _check_layer(layer, len(head.decoder(0).layers))
    _check_decoder(decoder)
    features = model.visual_features([{"image": image}])  # (1, C, h, w)
    h, w = features.shape[-2:]
    if tokens is None:
        tokens = model.generate(features, decoder=decoder)[0]
    tokens = [int(t) for t in tokens]
    if tokens:
        memory = head.memory(head.project_visual(features), 0)
        # Teacher forcing over [SOS] t_1 .. t_{n-1}: position i predicted t_{i+1}.
        inputs = torch.tensor([[SOS_ID, *tokens[:-1]]], device=features.device)
        _, weights = head(inputs, memory, 0, causal=True, need_weights=True)
        token_maps = combine_attention(weights, layer)[0].reshape(len(tokens), h, w).cpu()
    else:  # the decoder emitted [EOS] first: an empty caption has no words to show
        token_maps = torch.zeros(0, h, w)
    spans = word_spans(model.tokenizer, tokens)
    word_maps = (
        torch.stack([token_maps[positions].mean(dim=0) for _, positions in spans])
        if spans
        else torch.zeros(0, h, w)
    )
    return CaptionAttention(
        caption=model.tokenizer.decode(tokens),
        tokens=tokens,
        words=[word for word, _ in spans],
        token_maps=token_maps,
        word_maps=word_maps,
    )


def model_tool_parser(doc: str, input_help: str, output_help: str) -> argparse.ArgumentParser:
    """The arguments shared by the captioning tools (model, input, output, decoder)."""

    parser = argparse.ArgumentParser(
        description=doc.split("\n\n")[0].strip(),
        epilog=doc.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config-file", required=True, help="the model's training config")
    parser.add_argument("--weights", required=True, help="Detectron2 checkpoint (.pth)")
    parser.add_argument("--input", required=True, help=input_help)
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument(
        "--decoder",
        choices=DECODERS,
        help="default: the config's MODEL.VIRTEX.DECODER.NAME",
    )
    return parser
