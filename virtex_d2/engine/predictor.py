"""``CaptionPredictor``: a VirTex captioning model ready to caption images, after Detectron2's
``DefaultPredictor``.

It builds the model of a config, loads weights through the project's one checkpointer and
holds the config's evaluation augmentations (resize the shorter side to
``INPUT.VIRTEX.TEST_RESIZE``, centre crop ``TEST_CROP_SIZE``), so an image is prepared exactly
as in evaluation. Used by ``tools/caption_images.py``, ``tools/visualize_attention.py``,
``tools/check_grounding.py`` and the demo.

Files are read by :func:`virtex_d2.data.image_io.load_image_rgb` (its docstring states the
policy); :meth:`CaptionPredictor.caption_files` logs each unreadable file (one warning, with
the reason) and lists it under ``skipped`` instead of stopping.

Attention (:meth:`CaptionPredictor.attention`): per-token maps as in
:mod:`virtex_d2.modeling.attention`; a word made of several sub-word tokens gets the mean of
its tokens' maps.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.modeling import build_model
from tqdm import tqdm

from ..config import CAPTIONING_TASKS, DECODERS
from ..data.caption_mapper import build_caption_augmentations, eval_image_tensor
from ..data.image_io import UnreadableImageError, load_image_rgb
from ..data.tokenizer import word_spans
from ..modeling.attention import check_layer, token_attention_maps
from .checkpoint import build_checkpointer

logger = logging.getLogger(__name__)

# An (H, W, 3) uint8 RGB image, or a (3, S, S) uint8 input already prepared by ``prepare``.
ImageInput = Union[np.ndarray, torch.Tensor]


@dataclass
class CaptionResults:
    """Output of :meth:`CaptionPredictor.caption_files`; ``to_json`` gives the tools' layout."""

    captions: list[dict] = field(default_factory=list)  # {"file_name", "caption"}
    skipped: list[dict] = field(default_factory=list)  # {"file_name", "error"}

    def to_json(self) -> dict:
        return {
            "captions": self.captions,
            "skipped": self.skipped,
            "num_captioned": len(self.captions),
            "num_skipped": len(self.skipped),
        }


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


def _check_decoder(decoder: str | None) -> None:
    if decoder is not None and decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS} or None, got {decoder!r}")


class CaptionPredictor:
    """Captions for single images, batches and files; per-word attention maps.

    ``weights`` defaults to ``cfg.MODEL.WEIGHTS``. Loading keeps weights only unless
    ``MODEL.ALLOW_PICKLE_WEIGHTS`` and requires every parameter, so a checkpoint without the
    textual head is an error naming it. Raises ValueError for a config that cannot caption,
    FileNotFoundError for a missing weights file, and the checkpointer's errors
    (``virtex_d2.engine.checkpoint``) for weights that do not fit.

    A ``decoder`` argument overrides ``MODEL.VIRTEX.DECODER.NAME`` for one call. With nucleus
    sampling the sampled captions depend on how images are batched.
    """

    def __init__(self, cfg: CfgNode, weights: str | None = None):
        task = cfg.MODEL.VIRTEX.TASK
        if task not in CAPTIONING_TASKS:
            raise ValueError(
                f"MODEL.VIRTEX.TASK is {task!r}: only {'/'.join(CAPTIONING_TASKS)} models "
                "generate captions; pass the config the checkpoint was trained with"
            )
        if cfg.INPUT.FORMAT != "RGB":
            # Images are loaded as RGB here; VirTex's PIXEL_MEAN/STD are in RGB order.
            raise ValueError(
                f"INPUT.FORMAT must be 'RGB' for VirTex models, got {cfg.INPUT.FORMAT!r}"
            )
        # Name where the path came from: the tools pass their --weights argument here.
        source = "--weights" if weights is not None else "MODEL.WEIGHTS"
        weights = cfg.MODEL.WEIGHTS if weights is None else weights
        if not weights:
            # Random weights would caption nonsense without any sign of a mistake.
            raise FileNotFoundError("no weights to load: pass weights or set MODEL.WEIGHTS")
        if "://" not in weights and not os.path.isfile(weights):
            raise FileNotFoundError(f"{source} {weights} does not exist")
        self.cfg = cfg.clone()  # building the model may modify it, as in DefaultPredictor
        self.model = build_model(self.cfg)
        build_checkpointer(self.cfg, self.model, eval_only=True).load(weights)
        self.model.eval()
        self.tokenizer = self.model.tokenizer
        self.augmentations = build_caption_augmentations(self.cfg, is_train=False)

    def prepare(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 RGB -> the model's (3, S, S) uint8 input (eval augmentations)."""
        return eval_image_tensor(image, self.augmentations)

    def _input(self, image: ImageInput) -> torch.Tensor:
        return image if isinstance(image, torch.Tensor) else self.prepare(image)

    @torch.no_grad()
    def caption_tokens(
        self, images: Sequence[ImageInput], decoder: str | None = None
    ) -> list[list[int]]:
        """Token ids (no [SOS]/[EOS]) of each image, in one forward pass."""
        _check_decoder(decoder)
        features = self.model.visual_features([{"image": self._input(im)} for im in images])
        return self.model.generate(features, decoder=decoder)

    def caption_batch(self, images: Sequence[ImageInput], decoder: str | None = None) -> list[dict]:
        """``{"caption", "tokens"}`` of each image (RGB arrays or prepared inputs)."""
        return [
            {"caption": self.tokenizer.decode(ids), "tokens": ids}
            for ids in self.caption_tokens(images, decoder)
        ]

    def __call__(self, image: np.ndarray, decoder: str | None = None) -> dict:
        """``{"caption", "tokens"}`` of one (H, W, 3) uint8 RGB image."""
        return self.caption_batch([image], decoder)[0]

    def _prepared_batches(
        self, files: Sequence[str], batch_size: int, num_workers: int
    ) -> Iterator[list[tuple[str, torch.Tensor | UnreadableImageError]]]:
        """Batches of (path, model input or the load error). With ``num_workers`` > 0 the next
        batch is decoded in threads while the caller runs the model (Pillow releases the GIL
        while decoding); at most two batches are held in memory."""

        def prepare(path: str) -> torch.Tensor | UnreadableImageError:
            try:
                image = load_image_rgb(path)
            except UnreadableImageError as e:
                return e
            return self.prepare(image)

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
        self,
        files: Sequence[str],
        batch_size: int = 16,
        num_workers: int = 4,
        progress: bool = True,
        *,
        decoder: str | None = None,
    ) -> CaptionResults:
        """Caption ``files`` in order, ``batch_size`` images per forward pass; unreadable files
        are logged (one warning each, with the reason) and listed in ``skipped``."""
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        results = CaptionResults()
        bar = tqdm(total=len(files), unit="img", desc="captioning", disable=not progress)
        with bar:
            for batch in self._prepared_batches(files, batch_size, num_workers):
                good = []
                for path, item in batch:
                    if isinstance(item, UnreadableImageError):
                        logger.warning("skipped %s: %s", path, item.reason)
                        results.skipped.append({"file_name": path, "error": item.reason})
                    else:
                        good.append((path, item))
                if good:
                    outputs = self.caption_batch([t for _, t in good], decoder)
                    for (path, _), out in zip(good, outputs):
                        results.captions.append({"file_name": path, "caption": out["caption"]})
                bar.update(len(batch))
        return results

    @torch.no_grad()
    def attention(
        self,
        image: ImageInput,
        tokens: Sequence[int] | None = None,
        decoder: str | None = None,
        layer: int | None = None,
    ) -> CaptionAttention:
        """Caption one image (or use the given ``tokens``) and return where the forward
        textual head, the one that generates captions, looked for each token and word."""
        head = self.model.textual_head
        check_layer(layer, len(head.decoder(0).layers))
        _check_decoder(decoder)
        features = self.model.visual_features([{"image": self._input(image)}])  # (1, C, h, w)
        if tokens is None:
            tokens = self.model.generate(features, decoder=decoder)[0]
        tokens = [int(t) for t in tokens]
        token_maps = token_attention_maps(head, features, tokens, layer)
        spans = word_spans(self.tokenizer, tokens)
        word_maps = (
            torch.stack([token_maps[positions].mean(dim=0) for _, positions in spans])
            if spans
            else torch.zeros(0, *token_maps.shape[1:])
        )
        return CaptionAttention(
            caption=self.tokenizer.decode(tokens),
            tokens=tokens,
            words=[word for word, _ in spans],
            token_maps=token_maps,
            word_maps=word_maps,
        )
