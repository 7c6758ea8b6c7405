"""Dataset mapper and data loaders for image classification.

The mapper turns a record ``{"file_name", "image_id", "label", ...}`` into
``{"image": uint8 tensor (3, S, S) in INPUT.FORMAT, "label": int, "image_id", "file_name"}``.
Every output image of one mode has the same size (a crop), so the model stacks a batch without
padding, which would change what global average pooling sees.

Training goes through the same resumable loader as pretraining and detection
(``train_loader.build_resumable_train_loader``): batches depend only on (seed, iteration), and
an unreadable image (``image_io.UnreadableImageError``) is skipped and counted under
``DATALOADER.VIRTEX_MAX_BAD_FRACTION``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from typing import Any, Callable

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import (
    DatasetFromList,
    MapDataset,
    MetadataCatalog,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.build import trivial_batch_collator
from detectron2.data.samplers import InferenceSampler

from .image_io import chw_tensor, load_image_rgb
from .resumable import ResumableTrainLoader
from .train_loader import build_resumable_train_loader
from .transforms import CenterCrop, RandomResizedCrop

logger = logging.getLogger(__name__)

__all__ = [
    "ClassificationDatasetMapper",
    "build_classification_augmentations",
    "build_eval_augmentations",
    "build_inference_loader",
    "check_classification_records",
    "build_classification_train_loader",
    "build_classification_test_loader",
]

# load_image_rgb decodes to RGB; BGR is the same pixels reversed. Other Detectron2 formats
# (L, YUV) would need Detectron2's reader, whose errors the bad-data policy cannot name.
_FORMATS = ("RGB", "BGR")


def build_eval_augmentations(mode: str, resize: int, crop_size: int) -> list[T.Augmentation]:
    """Deterministic evaluation transforms.

    Args:
        mode: "shorter" (shorter side to ``resize``, then the central ``crop_size`` square) or
            "global" (whole image to ``resize`` x ``resize``, aspect ratio not kept).
    """
    if mode == "shorter":
        if crop_size > resize:
            raise ValueError(f"centre crop {crop_size} is larger than the resized side {resize}")
        return [T.ResizeShortestEdge(resize, max_size=10**6), CenterCrop(crop_size)]
    if mode == "global":
        return [T.Resize((resize, resize))]
    raise ValueError(f"unknown resize mode {mode!r}; expected 'shorter' or 'global'")


def build_classification_augmentations(cfg, is_train: bool) -> list[T.Augmentation]:
    """Training: random-resized crop + flip; evaluation: shorter-side resize + centre crop."""
    c = cfg.INPUT.CLASSIFICATION
    if not is_train:
        return build_eval_augmentations("shorter", c.TEST_RESIZE, c.TEST_CROP_SIZE)
    augs: list[T.Augmentation] = [
        RandomResizedCrop(c.TRAIN_CROP_SIZE, c.TRAIN_CROP_SCALE, c.TRAIN_CROP_RATIO)
    ]
    if c.HFLIP_PROBABILITY > 0:
        augs.append(T.RandomFlip(prob=c.HFLIP_PROBABILITY, horizontal=True, vertical=False))
    return augs


class ClassificationDatasetMapper:
    """Read, augment and tensorise one classification record (see the module docstring)."""

    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        augmentations: Sequence[T.Augmentation],
        image_format: str = "RGB",
        require_label: bool = True,
    ):
        """
        Args:
            is_train: only used for logging; randomness lives in the augmentations.
            augmentations: Detectron2 augmentations applied in order.
            image_format: "RGB" or "BGR" (``INPUT.FORMAT``).
            require_label: raise if a record has no integer ``label`` (feature extraction for
                the SVMs takes its targets elsewhere and sets this False).
        """
        if image_format not in _FORMATS:
            raise ValueError(
                f"INPUT.FORMAT {image_format!r} is not supported by the classification mapper; "
                f"use one of {_FORMATS}"
            )
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.require_label = require_label
        mode = "train" if is_train else "test"
        logger.info(f"ClassificationDatasetMapper ({mode}): {list(augmentations)}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_classification_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: dict[str, Any]) -> dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        if self.require_label and not isinstance(d.get("label"), (int, np.integer)):
            raise KeyError(
                f"record {d.get('file_name')} has no integer 'label'; classification datasets "
                "must give one class index per image"
            )
        image = load_image_rgb(d["file_name"])
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        if "height" in d and "width" in d:
            utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        # shape: (3, S, S), uint8; normalisation happens in the model, on its device.
        d["image"] = chw_tensor(aug_input.image)
        if "label" in d:
            d["label"] = int(d["label"])
        # Detection-only keys would only cost collation time.
        d.pop("annotations", None)
        return d


def build_inference_loader(
    records: list[dict[str, Any]], mapper, batch_size: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Ordered, batched loader over ``records``; in a distributed run each process gets a
    contiguous shard (Detectron2's ``InferenceSampler``), so every image is seen once."""
    dataset = MapDataset(DatasetFromList(records, copy=False), mapper)
    sampler = InferenceSampler(len(dataset))
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
    )


def check_classification_records(cfg, records: list[dict[str, Any]]) -> None:
    """Refuse, before training starts, a dataset whose classes or labels do not fit
    ``MODEL.CLASSIFIER.NUM_CLASSES`` (a wrong label would otherwise fail inside the loss)."""
    num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
    for name in cfg.DATASETS.TRAIN:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"dataset '{name}' has {len(classes)} classes but MODEL.CLASSIFIER.NUM_CLASSES "
                f"is {num_classes}; set it to {len(classes)}"
            )
    bad = next((r for r in records if not 0 <= int(r.get("label", -1)) < num_classes), None)
    if bad is not None:
        raise ValueError(
            f"record {bad.get('file_name')} has label {bad.get('label')}, outside "
            f"[0, MODEL.CLASSIFIER.NUM_CLASSES={num_classes})"
        )


def build_classification_train_loader(cfg) -> ResumableTrainLoader:
    """The resumable training loader of ``DATASETS.TRAIN`` (batches are lists of mapper outputs,
    ``SOLVER.IMS_PER_BATCH`` in total over all processes)."""
    return build_resumable_train_loader(
        cfg, ClassificationDatasetMapper(cfg, True), check_records=check_classification_records
    )


def build_classification_test_loader(
    cfg, dataset_name: str, mapper: Callable[[dict], Any] | None = None
) -> torch.utils.data.DataLoader:
    """Batched evaluation loader (``TEST.CLASSIFICATION.IMS_PER_BATCH`` images per process);
    Detectron2 v0.6's test loader is fixed to one image per batch."""
    records = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    if mapper is None:
        mapper = ClassificationDatasetMapper(cfg, False)
    return build_inference_loader(
        records, mapper, cfg.TEST.CLASSIFICATION.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS
    )
