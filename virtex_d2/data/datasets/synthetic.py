"""A deterministic synthetic "shapes" dataset in the real COCO, COCO Captions and LVIS v1
formats, so every code path that real data takes can run on a CPU in seconds.

Layout written under ``output_dir``::

    train/000000000001.jpg ...              JPEG images, RGB, square, ``image_size`` pixels
    val/000000500001.jpg ...
    annotations/captions_{train,val}.json   COCO Captions: 5 captions per image
    annotations/instances_{train,val}.json  COCO instances: 7 shape classes with ids that are
                                            not 1..K; polygons for every object, a few
                                            iscrowd regions as uncompressed RLE (as in COCO)
    annotations/lvis_{train,val}.json       LVIS v1: 56 colour x shape classes (ids 1..56),
                                            long-tailed; frequency r/c/f from train counts
    .synthetic_complete.json                completion marker, written last

Each image holds 1-5 shapes (7 shapes, 8 named colours, 3 named sizes) on a textured
background, and every 12th image a crowd of tiny shapes. Later shapes occlude earlier ones,
but every shape stays >= 60% visible and its visible region has no holes, so polygons
describe it exactly (pixel-exact outlines for occluded shapes, the shape's own vertices
otherwise). Captions name shapes, colours, sizes, counts, absolute positions and
left/right/above/below relations, all geometrically true; swapping the words "left" and
"right" keeps them true for the mirrored image.

Why 128 px and 600/100 images by default: a ResNet's last stage is then a 4x4 grid (enough
for "left of" to be learnable), the smallest shape's circumscribed diameter is ~18 px,
generation takes a few seconds on one core, and 600 train images give the LVIS split
frequent (>100 images), common and rare categories, all of which also occur in val.

This module builds the annotations, writes the splits and generates the dataset on demand;
scenes are drawn by ``synthetic_scene`` and captioned by ``synthetic_captions``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from typing import Any

import numpy as np
import portalocker
import pycocotools.mask as mask_util
from iopath.common.file_io import file_lock
from PIL import Image

# Re-exported names (COLOURS, SHAPE_PLURALS, ...) keep imports from this module working.
from .synthetic_captions import SHAPE_PLURALS, make_captions  # noqa: F401
from .synthetic_scene import (  # noqa: F401
    _WEIGHTS,
    COCO_CATEGORIES,
    COLOURS,
    LVIS_CATEGORY_NAMES,
    SHAPE_NAMES,
    _bbox_of,
    _make_image,
    _outline_polygons,
    _uncompressed_rle,
    lvis_frequency,
)

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- constants
DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 128
MARKER_NAME = ".synthetic_complete.json"
# Bump when the output changes, so that ensure_synthetic_dataset() regenerates old data.
GENERATOR_VERSION = 2
_SPLIT_ID_BASE = {"train": 0, "val": 500000}
_JPEG_QUALITY = 92
_FIXED_DATE = "2024-01-01 00:00:00"  # fixed, so that output bytes depend on the seed only


# ---------------------------------------------------------------------------- annotations
def _segmentation(obj: dict[str, Any], visible: np.ndarray) -> list[list[float]]:
    """Polygons of the visible region: the shape's own vertices when nothing covers it,
    else the exact pixel outline of what is left."""
    if int(visible.sum()) == obj["full_area"]:
        return [obj["polygon"]]
    polygons, has_holes = _outline_polygons(visible)
    if has_holes or not polygons:  # excluded by _acceptable(): reaching this is a bug
        raise RuntimeError(f"The visible region of {obj} cannot be written as polygons")
    return polygons


def _coco_category_id(shape: str) -> int:
    return COCO_CATEGORIES[SHAPE_NAMES.index(shape)]["id"]


def _annotate(image_id, scene, visible, crowd_mask, rng, size, counters):
    """COCO annotations, LVIS annotations and LVIS image fields of one painted scene. Area
    and bbox come from decoding the written segmentation, so they match what pycocotools and
    Detectron2 decode."""
    coco, lvis, present = [], [], set()
    for obj, mask in zip(scene["objects"], visible):
        polygons = _segmentation(obj, mask)
        decoded = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, size, size)))
        area, bbox = int(decoded.sum()), _bbox_of(decoded)
        obj.update(visible_area=area, bbox=bbox)
        counters["object"] += 1
        common = {"id": counters["object"], "image_id": image_id, "area": area, "bbox": bbox}
        # As in real COCO, every non-crowd object is a polygon (Detectron2's default
        # INPUT.MASK_FORMAT "polygon" cannot read RLE for them); RLE is for crowds only.
        category = _coco_category_id(obj["shape"])
        coco.append({**common, "category_id": category, "segmentation": polygons, "iscrowd": 0})
        lvis.append({**common, "category_id": obj["lvis_index"] + 1, "segmentation": polygons})
        present.add(obj["lvis_index"] + 1)
    not_exhaustive = []
    if scene["crowd"] is not None:
        counters["object"] += 1
        coco.append(
            {
                "id": counters["object"],
                "image_id": image_id,
                "category_id": _coco_category_id(scene["crowd"]["shape"]),
                "segmentation": _uncompressed_rle(crowd_mask),
                "area": int(crowd_mask.sum()),
                "bbox": _bbox_of(crowd_mask),
                "iscrowd": 1,
            }
        )
        # LVIS has no crowd annotations: the category is in the image but not exhaustively
        # annotated there.
        not_exhaustive = [scene["crowd"]["lvis_index"] + 1]
    # Negative categories: a sample of those verified absent (no shape, no crowd).
    absent = sorted(set(range(1, len(LVIS_CATEGORY_NAMES) + 1)) - present - set(not_exhaustive))
    negatives = sorted(int(c) for c in rng.choice(absent, size=min(6, len(absent)), replace=False))
    lvis_fields = {"not_exhaustive_category_ids": not_exhaustive, "neg_category_ids": negatives}
    return coco, lvis, lvis_fields


def _generate_split(split, num_images, size, seed, output_dir, forced, progress, counters):
    """Paint, save and annotate one split. Returns its json lists and scene descriptions."""
    os.makedirs(os.path.join(output_dir, split), exist_ok=True)
    names = ("images", "captions", "coco", "lvis", "lvis_images", "scenes")
    out: dict[str, list] = {k: [] for k in names}
    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synthetic {split}", unit="img")
    for i in indices:
        # One generator per image: no image depends on another's random draws.
        rng = np.random.default_rng([seed, list(_SPLIT_ID_BASE).index(split), i])
        image_id = _SPLIT_ID_BASE[split] + 1 + 3 * i  # sparse ids, like COCO's
        file_name = f"{image_id:012d}.jpg"
        # Every 12th image (from the 6th on) has a crowd, so even tiny splits have one.
        image, scene, visible, crowd_mask = _make_image(rng, size, forced, i % 12 == 5)
        path = os.path.join(output_dir, split, file_name)
        Image.fromarray(image).save(path, format="JPEG", quality=_JPEG_QUALITY)
        # LVIS v1 image records have no file_name: Detectron2 takes "<split>/<file>" from the
        # last two parts of coco_url.
        record = {
            "id": image_id,
            "height": size,
            "width": size,
            "license": 1,
            "coco_url": f"http://synthetic.invalid/{split}/{file_name}",
            "date_captured": _FIXED_DATE,
        }
        out["images"].append({**record, "file_name": file_name})
        for text in make_captions(rng, scene["objects"], scene["background"], scene["crowd"], size):
            counters["caption"] += 1
            caption = {"id": counters["caption"], "image_id": image_id, "caption": text}
            out["captions"].append(caption)
        coco, lvis, lvis_fields = _annotate(
            image_id, scene, visible, crowd_mask, rng, size, counters
        )
        out["coco"] += coco
        out["lvis"] += lvis
        out["lvis_images"].append({**record, **lvis_fields})
        out["scenes"].append({"image_id": image_id, "file_name": file_name, **scene})
    return out


def _lvis_categories(train_annotations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """LVIS v1 category records; counts and frequency come from the train split."""
    images: dict[int, set] = {c: set() for c in range(1, len(LVIS_CATEGORY_NAMES) + 1)}
    instances = dict.fromkeys(images, 0)
    for ann in train_annotations:
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    return [
        {
            "id": c,
            "name": name,
            "synonyms": [name],
            "synset": f"{name}.n.01",
            "def": f"a {name.replace('_', ' ')} drawn on a synthetic image",
            "frequency": lvis_frequency(len(images[c])),
            "image_count": len(images[c]),
            "instance_count": instances[c],
        }
        for c, name in enumerate(LVIS_CATEGORY_NAMES, start=1)
    ]


def _write_json(path: str, obj: Any) -> None:
    # Sorted keys and fixed separators: the same content always gives the same bytes.
    with open(path, "w") as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))


def _write_split(output_dir: str, split: str, data: dict[str, list], lvis_categories: list):
    """Write the three json files of a split; returns its entry of the summary."""
    paths = {
        k: os.path.join(output_dir, "annotations", f"{k}_{split}.json")
        for k in ("captions", "instances", "lvis")
    }
    header = {
        "info": {
            "description": "virtex-d2 synthetic shapes",
            "version": str(GENERATOR_VERSION),
            "year": 2024,
            "contributor": "virtex_d2",
            "date_created": _FIXED_DATE,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
    }
    coco_images = {**header, "images": data["images"]}
    _write_json(paths["captions"], {**coco_images, "annotations": data["captions"]})
    _write_json(
        paths["instances"],
        {**coco_images, "annotations": data["coco"], "categories": COCO_CATEGORIES},
    )
    _write_json(
        paths["lvis"],
        {
            **header,
            "images": data["lvis_images"],
            "annotations": data["lvis"],
            "categories": lvis_categories,
        },
    )
    crowd = sum(a["iscrowd"] for a in data["coco"])
    return {
        "num_images": len(data["images"]),
        "num_objects": len(data["coco"]) - crowd,
        "num_rle": sum(isinstance(a["segmentation"], dict) for a in data["coco"]),
        "num_crowd": crowd,
        "num_captions": len(data["captions"]),
        "image_dir": os.path.join(output_dir, split),
        **{f"{k}_json": path for k, path in paths.items()},
    }


def generate_synthetic_dataset(
    output_dir: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = False,
    return_scenes: bool = False,
) -> dict[str, Any]:
    """Write the synthetic shapes dataset under ``output_dir`` (layout in the module
    docstring). The same arguments always give byte-identical files.

    Args:
        output_dir: created if missing; existing files of the same names are overwritten.
        num_train, num_val: number of images per split (>= 1).
        image_size: side of the square images in pixels (>= 64).
        seed: seeds everything random.
        progress: show a tqdm progress bar per split.
        return_scenes: add the scene of every image under ``"scenes"``: {split: [{"image_id",
            "file_name", "background", "crowd": None or {"shape", "colour", "center"},
            "objects": [{"shape", "colour", "size", "center": [x, y] (pixels), "radius",
            "polygon" (full outline), "full_area", "visible_area", "bbox": [x, y, w, h] of
            the visible part, "lvis_index"}, ...] in drawing order}, ...]}.

    Returns:
        ``{"output_dir", "image_size", "seed", "seconds", "splits": {split: {"num_images",
        "num_objects", "num_rle", "num_crowd", "num_captions", "image_dir", "captions_json",
        "instances_json", "lvis_json"}}, "lvis_frequency": {split: {"r", "c", "f": number of
        categories of the group with annotations in the split}}}``, plus "scenes" if asked.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 to keep shapes visible, got {image_size}")
    start = time.perf_counter()
    marker = os.path.join(output_dir, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)  # the directory is incomplete until this generation finishes
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    # Every LVIS category is put into the train split once first, so none has zero images.
    forced = [int(c) for c in np.random.default_rng([seed, 99]).permutation(len(_WEIGHTS))]
    counters = {"caption": 0, "object": 0}  # ids are unique across splits, as in COCO
    splits = {}
    for split, num in (("train", num_train), ("val", num_val)):
        forced_here = forced if split == "train" else []
        splits[split] = _generate_split(
            split, num, image_size, seed, output_dir, forced_here, progress, counters
        )
    lvis_categories = _lvis_categories(splits["train"]["lvis"])
    summary: dict[str, Any] = {"output_dir": output_dir, "image_size": image_size, "seed": seed}
    summary["splits"], summary["lvis_frequency"] = {}, {}
    for split, data in splits.items():
        summary["splits"][split] = _write_split(output_dir, split, data, lvis_categories)
        groups: dict[str, set] = {"r": set(), "c": set(), "f": set()}
        for ann in data["lvis"]:
            groups[lvis_categories[ann["category_id"] - 1]["frequency"]].add(ann["category_id"])
        summary["lvis_frequency"][split] = {k: len(v) for k, v in groups.items()}
    if return_scenes:
        summary["scenes"] = {split: data["scenes"] for split, data in splits.items()}
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    _write_json(marker, {"version": GENERATOR_VERSION, **params})  # last: marks completion
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


# ---------------------------------------------------------------------------- on demand
def is_synthetic_dataset_complete(root: str) -> bool:
    """Whether ``root`` holds a finished generation by this version of the generator."""
    try:
        with open(os.path.join(root, MARKER_NAME)) as f:
            return json.load(f).get("version") == GENERATOR_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def ensure_synthetic_dataset(root: str, wait_timeout_s: float = 900.0) -> str:
    """Generate the synthetic dataset with the default arguments under ``root`` unless a
    complete one is there; returns ``root``.

    Several processes (e.g. the ranks of one job) may call this at once: iopath's
    ``file_lock`` on ``<root>.lock`` lets one of them generate while the others wait, then
    find the completion marker and reuse the files. An interrupted generation has no marker
    and is redone; the operating system frees the lock of a process that died, so its lock
    file does not block anyone.
    """
    if is_synthetic_dataset_complete(root):
        return root
    path = os.path.abspath(root).rstrip(os.sep)
    lock_path = path + ".lock"
    left_behind = os.path.exists(lock_path)
    lock = file_lock(path)
    try:
        lock.acquire(timeout=wait_timeout_s, check_interval=0.5, fail_when_locked=False)
    # portalocker 2.x raises LockException when the wait runs out, newer ones AlreadyLocked.
    except portalocker.LockException as e:
        raise TimeoutError(
            f"Could not take the lock {lock_path} within {wait_timeout_s:.0f}s: another process "
            f"is generating the synthetic dataset under {root}; if it is stuck, stop it and "
            f"retry ({type(e).__name__}: {e})"
        ) from e
    try:
        if is_synthetic_dataset_complete(root):  # another process generated it meanwhile
            return root
        if left_behind:
            logger.warning("Ignoring the stale lock %s of an interrupted generation", lock_path)
        logger.info(
            "Synthetic dataset not found in %s: generating it there (%d train / %d val "
            "images of %d px)",
            os.path.abspath(root),
            DEFAULT_NUM_TRAIN,
            DEFAULT_NUM_VAL,
            DEFAULT_IMAGE_SIZE,
        )
        summary = generate_synthetic_dataset(root)
        logger.info("Generated the synthetic dataset in %.1fs", summary["seconds"])
        # Removed while still held: a process blocked on this file then finds the marker,
        # and a later one never needs a lock. After a failure the file stays, harmless.
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_path)
    finally:
        lock.release()
    return root
