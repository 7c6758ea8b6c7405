"""Load COCO Captions json files (``captions_{train,val}2017.json`` and files in the same
format) into Detectron2-style dataset dicts, one per image with all of its captions."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from typing import Any

from detectron2.data import MetadataCatalog
from detectron2.utils.file_io import PathManager

logger = logging.getLogger(__name__)

__all__ = ["load_coco_captions_json"]


def _read_json(path: str) -> dict[str, Any]:
    with PathManager.open(path, "r") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid json: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a COCO json object at the top level")
    return data


def _require(record: Any, keys: Sequence[str], json_file: str, what: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{json_file}: {what} is not a json object: {record!r:.200}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise ValueError(
            f"{json_file}: {what} lacks the required field(s) {missing}: {record!r:.200}. "
            "COCO Captions files need images with id/file_name/height/width and annotations "
            "with image_id/caption."
        )


def _labels_per_image(
    instances_jsons: Sequence[str], image_ids: Sequence[int], dataset_name: str | None
) -> dict[int, list[int]]:
    """Contiguous class indices (0..K-1 in the order of sorted category ids) present in each
    image, crowd regions included: they too show that the class is in the image."""
    categories: list[dict[str, Any]] | None = None
    labels: dict[int, set] = {}
    for path in instances_jsons:
        data = _read_json(path)
        for key in ("images", "annotations", "categories"):
            if key not in data:
                raise ValueError(f"{path}: missing '{key}'; is it a COCO instances file?")
        cats = sorted(data["categories"], key=lambda c: c["id"])
        if categories is None:
            categories = cats
        elif [c["id"] for c in cats] != [c["id"] for c in categories]:
            raise ValueError(f"{path}: its categories differ from those of {instances_jsons[0]}")
        for img in data["images"]:
            labels.setdefault(img["id"], set())
        index = {c["id"]: i for i, c in enumerate(categories)}
        for ann in data["annotations"]:
            if ann["category_id"] not in index:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')} has category_id {ann['category_id']}, "
                    "which is not among its categories"
                )
            labels.setdefault(ann["image_id"], set()).add(index[ann["category_id"]])
    missing = [i for i in image_ids if i not in labels]
    if missing:
        raise ValueError(
            f"{len(missing)} captioned image(s) (e.g. id {missing[0]}) are not in the instances "
            f"file(s) {list(instances_jsons)}; pass the instances json of the same split(s)."
        )
    if dataset_name is not None and categories is not None:
        meta = MetadataCatalog.get(dataset_name)
        meta.set(thing_classes=[c["name"] for c in categories])
        meta.set(thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)})
    return {i: sorted(labels[i]) for i in image_ids}


def load_coco_captions_json(
    json_file: str,
    image_root: str,
    dataset_name: str | None = None,
    instances_json: str | Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Read a COCO Captions json file.

    Args:
        json_file: ``{"images": [{"id", "file_name", "height", "width", ...}],
            "annotations": [{"id", "image_id", "caption"}], ...}``.
        image_root: folder of the images. An image record may carry a ``split_dir`` field
            (a sub-folder of ``image_root``, e.g. "val2017") for files that mix splits.
        dataset_name: if given and ``instances_json`` is given, the metadata of this dataset
            gets ``thing_classes`` and ``thing_dataset_id_to_contiguous_id``.
        instances_json: COCO instances json file(s) covering the captioned images; adds
            ``"labels"`` to each record.

    Returns:
        One dict per image with at least one caption, sorted by image id:
        ``{"file_name": str, "image_id": int, "height": int, "width": int,
        "captions": [str, ...] (all captions of the image, stripped, in file order),
        "labels": [int, ...] (sorted contiguous class ids; only with instances_json)}``.
        Images without captions and empty or missing captions are dropped, with a log line
        giving their number.
    """
    data = _read_json(json_file)
    for key in ("images", "annotations"):
        if key not in data:
            raise ValueError(f"{json_file}: missing '{key}'; is it a COCO Captions file?")
    records: dict[int, dict[str, Any]] = {}
    for k, img in enumerate(data["images"]):
        _require(img, ("id", "file_name", "height", "width"), json_file, f"image #{k}")
        if not isinstance(img["file_name"], str) or not img["file_name"].strip():
            raise ValueError(
                f"{json_file}: image id {img['id']} has file_name {img['file_name']!r}; every "
                "image needs the name of its file under the image folder"
            )
        if img["id"] in records:
            raise ValueError(f"{json_file}: image id {img['id']} appears more than once")
        folder = os.path.join(image_root, img["split_dir"]) if "split_dir" in img else image_root
        records[img["id"]] = {
            "file_name": os.path.join(folder, img["file_name"]),
            "image_id": img["id"],
            "height": img["height"],
            "width": img["width"],
            "captions": [],
        }
    empty_ids: list[Any] = []
    for k, ann in enumerate(data["annotations"]):
        _require(ann, ("image_id",), json_file, f"annotation #{k}")
        if ann["image_id"] not in records:
            raise ValueError(
                f"{json_file}: caption annotation id {ann.get('id', f'#{k}')} refers to image id "
                f"{ann['image_id']}, which is not in its 'images'. The file is inconsistent; "
                "re-download or regenerate it."
            )
        caption = ann.get("caption")
        # Missing, non-string, empty and whitespace-only captions carry no text to learn from.
        # Non-ASCII text (accents, CJK, emoji) is kept: the tokenizer normalises it (NFKC) and
        # maps what its vocabulary lacks to [UNK]. Overlong captions are clipped when tokenized.
        if not isinstance(caption, str) or not caption.strip():
            empty_ids.append(ann.get("id", f"#{k}"))
            continue
        records[ann["image_id"]]["captions"].append(caption.strip())
    if empty_ids:
        logger.warning(
            "%s: dropped %d missing or empty caption(s) (absent, not text or whitespace only; "
            "annotation ids %s%s)",
            json_file,
            len(empty_ids),
            empty_ids[:5],
            ", ..." if len(empty_ids) > 5 else "",
        )
    kept = [records[i] for i in sorted(records) if records[i]["captions"]]
    if len(kept) < len(records):
        uncaptioned = [i for i in sorted(records) if not records[i]["captions"]]
        logger.warning(
            "%s: dropped %d image(s) without captions (image ids %s%s)",
            json_file,
            len(uncaptioned),
            uncaptioned[:5],
            ", ..." if len(uncaptioned) > 5 else "",
        )
    if instances_json is not None:
        paths = [instances_json] if isinstance(instances_json, str) else list(instances_json)
        labels = _labels_per_image(paths, [r["image_id"] for r in kept], dataset_name)
        for r in kept:
            r["labels"] = labels[r["image_id"]]
    logger.info(
        "Loaded %d images with %d captions from %s",
        len(kept),
        sum(len(r["captions"]) for r in kept),
        json_file,
    )
    return kept
