"""Detectron2's ``DatasetMapper`` with the image decoding of ``captioner.load_image_rgb``.

Detectron2's ``read_image`` converts with Pillow's ``convert("RGB")``, which clips 16-bit
greyscale images to white and drops transparency without compositing; it also raises Pillow's
many exception types for broken files. ``load_image_rgb`` applies EXIF orientation, scales
16-bit images, composites transparency on white and raises one ``UnreadableImageError`` naming
the file, which the training loader counts as a bad sample (``data.resumable``).
"""
from __future__ import annotations

import copy
import io

import numpy as np
import torch
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from PIL import Image

from .image_io import load_image_rgb


def read_image_checked(file_name: str, image_format: str, data: bytes | None = None) -> np.ndarray:
    """(H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR"); other formats use Detectron2's
    reader (``L``, ``YUV-BT.601``), which has its own conversion rules. ``data``: the encoded
    image (from a shard) instead of the file ``file_name``."""
    if image_format not in ("RGB", "BGR"):
        if data is None:
            return utils.read_image(file_name, format=image_format)
        # read_image opens paths only; the same two steps on the bytes.
        with Image.open(io.BytesIO(data)) as image:
            image = utils._apply_exif_orientation(image)
            return utils.convert_PIL_to_numpy(image, image_format)
    image = load_image_rgb(file_name, data)
    return np.ascontiguousarray(image[:, :, ::-1]) if image_format == "BGR" else image


class RobustDatasetMapper(DatasetMapper):
    """Same output as ``DatasetMapper``; only the image decoding differs (module docstring).

    A record whose width/height disagree with the decoded (EXIF-rotated) image still raises
    Detectron2's ``SizeMismatchError``: its boxes may be in another coordinate frame, so the
    training loader skips and counts it rather than training on misplaced boxes.
    """

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict["file_name"], self.image_format)
        utils.check_image_size(dataset_dict, image)
        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            sem_seg_gt = utils.read_image(dataset_dict.pop("sem_seg_file_name"), "L").squeeze(2)
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        image_shape = image.shape[:2]
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(
                dataset_dict, image_shape, transforms, proposal_topk=self.proposal_topk
            )
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            dataset_dict.pop("sem_seg_file_name", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image_shape)
        return dataset_dict
