"""Dataset mapper for VirTex pretraining: image augmentation plus the targets of every task.

Input: a caption dataset record ``{"file_name", "image_id", "height", "width",
"captions": [str, ...], optional "labels": [int, ...]}``; a record streamed from WebDataset
shards has ``"image_bytes"`` (the encoded image) and ``file_name`` only names it. Output (one
dict per image; padding to a batch happens in the meta-architecture, like ``ImageList`` for
images):

- ``image``: uint8 tensor (3, S, S) in ``INPUT.FORMAT`` (RGB for VirTex),
- ``caption``: the chosen caption (words "left"/"right" swapped if the image was flipped),
- ``caption_tokens``: int64 (L,) = [SOS] t_1 ... t_n [EOS], L <= MAX_CAPTION_LENGTH,
- ``noitpac_tokens`` (bicaptioning): [SOS] t_n ... t_1 [EOS] for the backward decoder,
- ``masked_tokens``/``mlm_labels`` (masked LM): corrupted input and targets (0 = not predicted),
- ``token_bag`` (token classification): int64 ids of the distinct caption tokens,
- ``labels`` (multilabel classification): int64 class indices present in the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T

from .fast_decode import FastCropPipeline, read_bytes
from .image_io import chw_tensor, read_image_checked
from .tokenizer import EOS_ID, MASK_ID, SOS_ID, CaptionTokenizer
from .transforms import (
    CenterCrop,
    ColorJitter,
    RandomResizedCrop,
    ResizeShorterSide,
    swap_left_right,
    was_flipped,
)
from .vocabulary import resolve_tokenizer

logger = logging.getLogger(__name__)


def build_caption_augmentations(cfg, is_train: bool) -> list[T.Augmentation]:
    """The paper's pretraining (train) or evaluation (resize + centre crop) augmentations."""
    v = cfg.INPUT.VIRTEX
    if not is_train:
        return [ResizeShorterSide(v.TEST_RESIZE, v.RESIZE_ANTIALIAS), CenterCrop(v.TEST_CROP_SIZE)]
    j = v.COLOR_JITTER
    augs: list[T.Augmentation] = [
        RandomResizedCrop(v.CROP_SIZE, v.CROP_SCALE, v.CROP_RATIO, v.RESIZE_ANTIALIAS)
    ]
    if v.HFLIP_PROBABILITY > 0:
        augs.append(T.RandomFlip(prob=v.HFLIP_PROBABILITY, horizontal=True, vertical=False))
    if j.PROBABILITY > 0:
        augs.append(ColorJitter(j.BRIGHTNESS, j.CONTRAST, j.SATURATION, j.HUE, j.PROBABILITY))
    return augs


def eval_image_tensor(image: np.ndarray, augmentations: Sequence[T.Augmentation]) -> torch.Tensor:
    """(H, W, 3) uint8 -> the model's (3, S, S) uint8 input after the eval augmentations, as
    :class:`CaptionDatasetMapper` prepares it for evaluation."""
    aug_input = T.AugInput(image)
    T.AugmentationList(list(augmentations))(aug_input)
    return chw_tensor(aug_input.image)


MLM_RULES = ("reference", "bert")


def mask_tokens(
    tokens: list[int],
    vocab_size: int,
    mask_prob: float,
    mask_token_prob: float,
    replace_prob: float,
    rng: np.random.RandomState | None = None,
    rule: str = "reference",
) -> tuple[list[int], list[int]]:
    """Corrupt the caption body (never [SOS]/[EOS]) for masked language modelling.

    ``rule`` "reference" (the paper's runs): exactly ceil(mask_prob * n) of the n body positions
    are chosen; a single chosen position always becomes [MASK]; otherwise each becomes [MASK]
    with probability ``mask_token_prob``, a random ordinary token with ``replace_prob``, or stays;
    only [MASK]ed positions get a label. "bert": each body position is chosen with probability
    ``mask_prob`` (at least one), corrupted the same way, and every chosen position is labelled.

    Returns (corrupted tokens, labels) where labels are 0 except at predicted positions.
    """
    if rule not in MLM_RULES:
        raise ValueError(f"MODEL.VIRTEX.MLM.RULE must be one of {MLM_RULES}, got {rule!r}")
    rng = rng or np.random
    body = np.arange(1, len(tokens) - 1)
    labels = [0] * len(tokens)
    corrupted = list(tokens)
    if len(body) == 0:
        return corrupted, labels
    if rule == "reference":
        count = min(len(body), math.ceil(len(body) * mask_prob))
        selected = rng.choice(body, size=count, replace=False)
    else:
        selected = body[rng.uniform(size=len(body)) < mask_prob]
        if len(selected) == 0:
            selected = np.array([rng.choice(body)])
    for pos in selected:
        r = 0.0 if len(selected) == 1 and rule == "reference" else rng.uniform()
        if r < mask_token_prob:
            corrupted[pos] = MASK_ID
        elif r < mask_token_prob + replace_prob:
            # Random ordinary token: special ids (< 4) are never sampled.
            corrupted[pos] = int(rng.randint(4, vocab_size))
        if rule == "bert" or corrupted[pos] == MASK_ID:
            labels[pos] = tokens[pos]
    return corrupted, labels


class CaptionDatasetMapper:
    """Maps a caption record to model inputs; see the module docstring for the output."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: list[T.Augmentation],
        tokenizer: CaptionTokenizer,
        task: str,
        max_caption_length: int = 30,
        image_format: str = "RGB",
        mlm_probabilities: tuple[float, float, float] = (0.15, 0.85, 0.1),
        mlm_rule: str = "reference",
        jpeg_draft: bool = True,
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.tokenizer = tokenizer
        self.task = task
        self.max_caption_length = max_caption_length
        self.image_format = image_format
        self.mlm_probabilities = mlm_probabilities
        self.mlm_rule = mlm_rule
        self.vocab_size = tokenizer.get_vocab_size()
        # Plain JPEGs skip Detectron2's augmentation machinery when the augmentations are the
        # pretraining ones: same random draws, same pixels, a third of the CPU time.
        self.fast = (
            FastCropPipeline.from_augmentations(augmentations, jpeg_draft)
            if image_format == "RGB"
            else None
        )
        logger.info(f"CaptionDatasetMapper ({'train' if is_train else 'test'}): {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        m = cfg.MODEL.VIRTEX
        return {
            "is_train": is_train,
            "augmentations": build_caption_augmentations(cfg, is_train),
            "tokenizer": resolve_tokenizer(cfg),
            "task": m.TASK,
            "max_caption_length": m.MAX_CAPTION_LENGTH,
            "image_format": cfg.INPUT.FORMAT,
            "mlm_probabilities": (
                m.MLM.MASK_PROBABILITY,
                m.MLM.MASK_TOKEN_PROBABILITY,
                m.MLM.REPLACE_PROBABILITY,
            ),
            "mlm_rule": m.MLM.RULE,
            "jpeg_draft": cfg.INPUT.VIRTEX.JPEG_DRAFT,
        }

    def tokenize(self, caption: str) -> list[int]:
        body = self.tokenizer.encode(caption)[: self.max_caption_length - 2]
        return [SOS_ID, *body, EOS_ID]

    def __call__(self, dataset_dict: dict) -> dict:
        # Shallow: values are replaced or popped, never changed in place.
        d = dict(dataset_dict)
        # Any pixel format and EXIF orientation; a broken file raises UnreadableImageError,
        # which the training loader counts as a bad sample. The record's width/height are not
        # checked: captions do not depend on them, and an EXIF-rotated photo legitimately
        # decodes with width and height swapped.
        # Records streamed from WebDataset shards carry the encoded image ("image_bytes").
        data = d.pop("image_bytes", None)
        fast = None
        if self.fast is not None:
            data = read_bytes(d["file_name"]) if data is None else data
            fast = self.fast(d["file_name"], data) if data is not None else None
        if fast is not None:
            image, flipped = fast
        else:
            image = read_image_checked(d["file_name"], self.image_format, data)
            aug_input = T.AugInput(image)
            flipped = was_flipped(self.augmentations(aug_input))
            image = aug_input.image
        d["image"] = chw_tensor(image)

        captions = d.pop("captions", None)
        if not captions:
            raise ValueError(f"record for {d.get('file_name')} has no captions")
        # Training samples one of the captions per visit; evaluation is deterministic.
        caption = captions[np.random.randint(len(captions))] if self.is_train else captions[0]
        if flipped:
            caption = swap_left_right(caption)
        d["caption"] = caption
        tokens = self.tokenize(caption)
        d["caption_tokens"] = torch.tensor(tokens, dtype=torch.long)
        if self.task == "bicaptioning":
            d["noitpac_tokens"] = torch.tensor([SOS_ID, *tokens[-2:0:-1], EOS_ID], dtype=torch.long)
        elif self.task == "masked_lm":
            masked, labels = mask_tokens(
                tokens, self.vocab_size, *self.mlm_probabilities, rule=self.mlm_rule
            )
            d["masked_tokens"] = torch.tensor(masked, dtype=torch.long)
            d["mlm_labels"] = torch.tensor(labels, dtype=torch.long)
        elif self.task == "token_classification":
            d["token_bag"] = torch.tensor(sorted(set(tokens[1:-1])), dtype=torch.long)
        if "labels" in d:
            d["labels"] = torch.as_tensor(d["labels"], dtype=torch.long)
        elif self.task == "multilabel_classification":
            raise ValueError(
                f"record for {d.get('file_name')} has no 'labels': multilabel classification "
                "needs a caption dataset registered with its instances json"
            )
        return d
