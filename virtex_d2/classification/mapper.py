"""Dataset mapper and data loaders for image classification.

The mapper turns a record ``{"file_name", "image_id", "label", ...}`` into
``{"image": uint8 tensor (3, S, S) in INPUT.FORMAT, "label": int, "image_id", "file_name"}``.
Every output image of one mode has the same size (a crop), so the model stacks a batch without
padding, which would change what global average pooling sees.
"""
from __future__ import annotations

import copy
import logging
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import (
    DatasetFromList,
    MapDataset,
    MetadataCatalog,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.data.samplers import InferenceSampler
from detectron2.solver import build_optimizer
from detectron2.utils import comm
from torch import nn

from ..data.transforms import CenterCrop, RandomResizedCrop

logger = logging.getLogger(__name__)

__all__ = [
    "ClassificationDatasetMapper",
    "build_classification_augmentations",
    "build_eval_augmentations",
    "build_inference_loader",
    "build_classification_train_loader",
    "build_classification_test_loader",
    "build_classification_optimizer",
]


def build_eval_augmentations(mode: str, resize: int, crop_size: int) -> List[T.Augmentation]:
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


def build_classification_augmentations(cfg, is_train: bool) -> List[T.Augmentation]:
    """Training: random-resized crop + flip; evaluation: shorter-side resize + centre crop."""
    c = cfg.INPUT.CLASSIFICATION
    if not is_train:
        return build_eval_augmentations("shorter", c.TEST_RESIZE, c.TEST_CROP_SIZE)
    augs: List[T.Augmentation] = [
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
            image_format: format passed to ``detection_utils.read_image``.
            require_label: raise if a record has no integer ``label`` (feature extraction for
                the SVMs takes its targets elsewhere and sets this False).
        """
        self.is_train = is_train
        self.augmentations = T.AugmentationList(list(augmentations))
        self.image_format = image_format
        self.require_label = require_label
        mode = "train" if is_train else "test"
        logger.info(f"ClassificationDatasetMapper ({mode}): {list(augmentations)}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True) -> Dict[str, Any]:
        return {
            "is_train": is_train,
            "augmentations": build_classification_augmentations(cfg, is_train),
            "image_format": cfg.INPUT.FORMAT,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        d = copy.deepcopy(dataset_dict)
        if self.require_label and not isinstance(d.get("label"), (int, np.integer)):
            raise KeyError(
                f"record {d.get('file_name')} has no integer 'label'; classification datasets "
                "must give one class index per image"
            )
        image = utils.read_image(d["file_name"], format=self.image_format)
        if "height" in d and "width" in d:
            utils.check_image_size(d, image)
        aug_input = T.AugInput(image)
        self.augmentations(aug_input)
        # shape: (3, S, S), uint8; normalisation happens in the model, on its device.
        d["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if "label" in d:
            d["label"] = int(d["label"])
        # Detection-only keys would only cost collation time.
        d.pop("annotations", None)
        return d


def _list_collate(batch: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    # Module level (not a lambda) so that worker processes can pickle it.
    return batch


def build_inference_loader(
    records: List[Dict[str, Any]], mapper, batch_size: int, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """Ordered, batched loader over ``records``; in a distributed run each process gets a
    contiguous shard (Detectron2's ``InferenceSampler``), so every image is seen once."""
    dataset = MapDataset(DatasetFromList(records, copy=False), mapper)
    sampler = InferenceSampler(len(dataset))
    batch_sampler = torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_list_collate
    )


def _check_labels(cfg, names: Sequence[str], records: List[Dict[str, Any]]) -> None:
    num_classes = cfg.MODEL.CLASSIFIER.NUM_CLASSES
    for name in names:
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


def build_classification_train_loader(cfg):
    """Infinite, shuffled training loader of ``DATASETS.TRAIN`` (batches are lists of mapper
    outputs, ``SOLVER.IMS_PER_BATCH`` in total over all processes)."""
    names = list(cfg.DATASETS.TRAIN)
    records = get_detection_dataset_dicts(names, filter_empty=False)
    _check_labels(cfg, names, records)
    return build_detection_train_loader(
        cfg,
        mapper=ClassificationDatasetMapper(cfg, True),
        dataset=records,
        # Square crops: grouping by aspect ratio would need height/width and gain nothing.
        aspect_ratio_grouping=False,
    )


def build_classification_test_loader(cfg, dataset_name: str):
    """Batched evaluation loader (``TEST.CLASSIFICATION.IMS_PER_BATCH`` images per process)."""
    records = get_detection_dataset_dicts([dataset_name], filter_empty=False)
    mapper = ClassificationDatasetMapper(cfg, False)
    return build_inference_loader(
        records, mapper, cfg.TEST.CLASSIFICATION.IMS_PER_BATCH, cfg.DATALOADER.NUM_WORKERS
    )


def build_classification_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Detectron2's SGD (``SOLVER.*``) over the trainable parameters.

    Detectron2 skips parameters with ``requires_grad=False``, so a linear probe optimises the
    classifier only; this checks that, rather than trusting it silently.
    """
    params = dict(model.named_parameters())
    trainable = [n for n, p in params.items() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameter")
    if cfg.MODEL.CLASSIFIER.FREEZE_BACKBONE:
        leaked = [n for n in trainable if ".backbone." in f".{n}"]
        if leaked:
            raise RuntimeError(f"linear probe, but backbone parameters are trainable: {leaked[:3]}")
    if comm.is_main_process():
        logger.info(f"Optimising {len(trainable)} of {len(params)} parameter tensors")
    return build_optimizer(cfg, model)
