"""Classification datasets: record loaders, and per-class VOC labels for the SVMs.

Single-label records (``evaluator_type`` "classification") are
``{"file_name": str, "image_id": hashable, "label": int}`` (plus ``height``/``width`` where the
source gives them); ``label`` indexes the dataset metadata's ``thing_classes``.

Sources (registered by ``builtin.register_classification_datasets``):

- an ``<root>/<class>/<image>`` tree (ImageNet): classes are torchvision's ``find_classes`` of
  a class root (the train split, so val labels agree with train even if a val folder is
  missing), images are found as torchvision's ``ImageFolder`` finds them, with
  :data:`~virtex_d2.data.image_io.IMAGE_EXTENSIONS`;
- an iNaturalist-2018-style json (COCO-like: images, annotations with one category per image,
  categories);
- a COCO instances json: label = class of the largest non-crowd object, ``labels`` = every
  class present (multi-label).

Class names of folder / json datasets are put into the metadata when the dataset is first
loaded. :func:`load_multilabel_targets` gives the VOC07 SVM protocol's per-class targets (+1
present, 0 difficult only, -1 absent) for VOC-style and multi-label sets.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import Any

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from torchvision.datasets.folder import find_classes, make_dataset

from ..image_io import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

__all__ = [
    "load_image_folder",
    "load_inat_json",
    "load_coco_instances_classification",
    "load_voc_multilabel",
    "load_multilabel_targets",
]


# ----------------------------------------------------------------------------------- helpers
def _set_classes(dataset_name: str | None, classes: list[str], source: str) -> None:
    """Record class names found at load time; refuse a change within one process."""
    if not dataset_name:
        return
    meta = MetadataCatalog.get(dataset_name)
    old = meta.get("thing_classes", None)
    if old is not None and list(old) != list(classes):
        raise RuntimeError(
            f"{source}: classes of '{dataset_name}' changed since it was registered or first "
            f"loaded ({len(old)} -> {len(classes)} classes); register the dataset again"
        )
    if old is None:
        meta.thing_classes = list(classes)


def _class_folders(root: str) -> list[str]:
    # torchvision's messages name neither the expected layout nor the ImageNet val pitfall.
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"image folder {root} does not exist; expected <root>/<class>/<image> (set "
            "$DETECTRON2_DATASETS or register the dataset with its real path)"
        )
    try:
        return find_classes(root)[0]
    except FileNotFoundError as e:
        raise ValueError(
            f"{root} has no class folders; expected <root>/<class>/<image>. ImageNet's "
            "validation images must first be sorted into one folder per class (wnid)."
        ) from e


# ----------------------------------------------------------------------------------- loaders
def load_image_folder(
    image_root: str, class_root: str | None = None, dataset_name: str | None = None
) -> list[dict[str, Any]]:
    """Records of an ``<image_root>/<class>/<image>`` tree (ImageNet layout).

    Args:
        image_root: folder with one sub-folder per class.
        class_root: folder whose sub-folders define the class list and label order (e.g. the
            train split for the val split); defaults to ``image_root``. A class folder of
            ``image_root`` missing from it is an error.
        dataset_name: if given, its metadata gets ``thing_classes``.
    """
    classes = _class_folders(class_root or image_root)
    index = {c: i for i, c in enumerate(classes)}
    found = _class_folders(image_root)
    unknown = [c for c in found if c not in index]
    if unknown:
        raise ValueError(
            f"{image_root}: class folder(s) {unknown[:5]} are not among the {len(classes)} "
            f"classes of {class_root}"
        )
    # Only the folders present here: make_dataset would raise for a class missing from them.
    samples = make_dataset(
        image_root, {c: index[c] for c in found}, extensions=IMAGE_EXTENSIONS, allow_empty=True
    )
    records = [
        {
            "file_name": path,
            "image_id": os.path.relpath(path, image_root).replace(os.sep, "/"),
            "label": label,
        }
        for path, label in samples
    ]
    if not records:
        raise ValueError(f"{image_root}: no images with extensions {IMAGE_EXTENSIONS}")
    _set_classes(dataset_name, classes, image_root)
    logger.info(f"Loaded {len(records)} images of {len(found)} classes from {image_root}")
    return records


def _read_json(json_file: str) -> dict[str, Any]:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            f"{json_file} does not exist (set $DETECTRON2_DATASETS or register the dataset "
            "with its real path)"
        )
    with open(json_file) as f:
        data = json.load(f)
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise KeyError(f"{json_file} has no '{key}' list; expected the COCO / iNat format")
    return data


def load_inat_json(
    json_file: str, image_root: str, dataset_name: str | None = None
) -> list[dict[str, Any]]:
    """Records of an iNaturalist-2018-style json (one annotation per image).

    Labels index the categories sorted by id (iNat 2018 ids are already 0..8141).
    """
    data = _read_json(json_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    label_of: dict[Any, int] = {}
    for ann in data["annotations"]:
        image_id, cat = ann["image_id"], ann["category_id"]
        if cat not in cat_index:
            raise ValueError(f"{json_file}: annotation {ann.get('id')} has unknown category {cat}")
        label = cat_index[cat]
        if label_of.setdefault(image_id, label) != label:
            raise ValueError(
                f"{json_file}: image {image_id} has annotations of two categories; a "
                "single-label classification json needs exactly one"
            )
    records = []
    for img in data["images"]:
        if img["id"] not in label_of:
            raise ValueError(
                f"{json_file}: image {img['id']} ({img.get('file_name')}) has no annotation; "
                "unlabelled splits (e.g. test2018) cannot be used for classification"
            )
        record = {
            "file_name": os.path.join(image_root, img["file_name"]),
            "image_id": img["id"],
            "label": label_of[img["id"]],
        }
        if "height" in img and "width" in img:
            record.update(height=img["height"], width=img["width"])
        records.append(record)
    _set_classes(dataset_name, [str(c.get("name", c["id"])) for c in categories], json_file)
    logger.info(f"Loaded {len(records)} images of {len(categories)} categories from {json_file}")
    return records


def load_coco_instances_classification(
    json_file: str, image_root: str, dataset_name: str | None = None
) -> list[dict[str, Any]]:
    """Classification records from a COCO instances json.

    ``label`` is the class of the largest non-crowd object (by ``area``, else box area; the
    first one on ties); ``labels`` lists every class present, sorted. Class indices follow the
    category ids in increasing order. Images without a non-crowd object have no label and are
    left out (their number is logged).
    """
    data = _read_json(json_file)
    categories = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(categories)}
    objects: dict[Any, list[tuple[float, int]]] = {}
    for ann in data["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        if ann["category_id"] not in cat_index:
            raise ValueError(
                f"{json_file}: annotation {ann.get('id')} has unknown category {ann['category_id']}"
            )
        area = ann.get("area")
        if area is None:
            area = float(ann["bbox"][2] * ann["bbox"][3])
        objects.setdefault(ann["image_id"], []).append((float(area), cat_index[ann["category_id"]]))
    records, skipped = [], 0
    for img in data["images"]:
        objs = objects.get(img["id"])
        if not objs:
            skipped += 1
            continue
        largest = max(range(len(objs)), key=lambda i: objs[i][0])  # first on ties
        records.append(
            {
                "file_name": os.path.join(image_root, img["file_name"]),
                "image_id": img["id"],
                "height": img["height"],
                "width": img["width"],
                "label": objs[largest][1],
                "labels": sorted({c for _, c in objs}),
            }
        )
    if skipped:
        logger.warning(f"{json_file}: {skipped} image(s) without a non-crowd object left out")
    if not records:
        raise ValueError(f"{json_file}: no image has a non-crowd object")
    _set_classes(dataset_name, [c["name"] for c in categories], json_file)
    return records


def load_voc_multilabel(
    dirname: str, split: str, class_names: Sequence[str]
) -> list[dict[str, Any]]:
    """Per-class image labels of a PASCAL VOC split, difficult flags kept.

    Detectron2's VOC loader keeps difficult objects without their flag, so the labels are read
    here from ``Annotations/<id>.xml``. ``targets`` (int8, (K,)) follows VOC's
    ``<class>_<split>.txt`` convention: +1 a non-difficult object of the class is present,
    0 only difficult ones, -1 absent.
    """
    list_file = os.path.join(dirname, "ImageSets", "Main", f"{split}.txt")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"{list_file} does not exist; expected a VOC devkit folder")
    with open(list_file) as f:
        file_ids = [line.split()[0] for line in f if line.strip()]
    index = {c: i for i, c in enumerate(class_names)}
    records = []
    for fid in file_ids:
        xml_file = os.path.join(dirname, "Annotations", f"{fid}.xml")
        try:
            tree = ET.parse(xml_file)
        except (OSError, ET.ParseError) as e:
            raise ValueError(f"cannot read {xml_file} (listed in {list_file}): {e}") from e
        targets = -np.ones(len(class_names), dtype=np.int8)
        for obj in tree.findall("object"):
            name = obj.findtext("name", "").strip()
            if name not in index:
                raise ValueError(
                    f"{xml_file}: object class {name!r} is not one of the dataset's "
                    f"{len(class_names)} classes"
                )
            difficult = int(obj.findtext("difficult", "0").strip() or 0)
            k = index[name]
            # Present beats difficult-only: one clear instance makes the label positive.
            targets[k] = max(int(targets[k]), 0 if difficult else 1)
        records.append(
            {
                "file_name": os.path.join(dirname, "JPEGImages", f"{fid}.jpg"),
                "image_id": fid,
                "targets": targets,
            }
        )
    if not records:
        raise ValueError(f"{list_file} lists no image")
    return records


def load_multilabel_targets(
    dataset_name: str,
) -> tuple[list[dict[str, Any]], np.ndarray, list[str]]:
    """Records, targets (N, K) int8 in {+1, 0, -1} (see :func:`load_voc_multilabel`) and class
    names of a registered dataset.

    VOC datasets (metadata ``dirname`` and ``split``, as registered by Detectron2's
    ``register_pascal_voc``) are read from their XML files; other datasets need ``labels``
    (all classes present) or ``label`` in their records, and have no difficult labels.
    """
    meta = MetadataCatalog.get(dataset_name)
    classes = meta.get("thing_classes", None)
    if meta.get("dirname", None) and meta.get("split", None):
        if classes is None:
            raise KeyError(f"VOC dataset '{dataset_name}' has no thing_classes metadata")
        records = load_voc_multilabel(meta.dirname, meta.split, classes)
        return records, np.stack([r["targets"] for r in records]), list(classes)
    records = DatasetCatalog.get(dataset_name)
    classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)  # may be set by load
    if classes is None:
        raise KeyError(f"dataset '{dataset_name}' has no thing_classes metadata")
    targets = -np.ones((len(records), len(classes)), dtype=np.int8)
    for i, r in enumerate(records):
        present = r.get("labels", [r["label"]] if "label" in r else None)
        if present is None:
            raise KeyError(
                f"record {r.get('file_name')} of '{dataset_name}' has neither 'labels' nor "
                "'label'; multi-label SVMs need one of them"
            )
        targets[i, list(present)] = 1
    return records, targets, list(classes)
