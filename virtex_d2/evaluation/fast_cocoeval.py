"""COCO and LVIS instance AP from COCO-format json, computed with faster-coco-eval.

This is the model-free half of :mod:`virtex_d2.evaluation.coco_lvis`: it takes ground truth and
detections in COCO results format and returns Detectron2-style metric dicts.

Formats:
    ground truth: a COCO / LVIS annotation file (path), the same as a dict, or an already
        indexed ``faster_coco_eval.COCO``. LVIS images carry ``neg_category_ids`` and
        ``not_exhaustive_category_ids``; LVIS categories carry ``frequency`` in {"r", "c", "f"}.
    results: a json path or a list of dicts ``{"image_id": int, "category_id": int (dataset id),
        "score": float, "bbox": [x, y, w, h] (absolute XYWH), "segmentation": RLE with str
        counts}``, as written by ``detectron2.evaluation.coco_evaluation.instances_to_coco_json``.
    metrics: percent (x100) floats; NaN where no category has a valid ground truth in the slice.

LVIS protocol (official ``lvis`` package, LVISResults + LVISEval) and what faster-coco-eval's
``lvis_style=True`` covers:
    - federated filtering of detections to each image's positive + negative categories: yes;
    - unmatched detections of a ``not_exhaustive_category_ids`` category ignored: yes;
    - APr / APc / APf from category ``frequency``: yes;
    - at most 300 detections **per image across categories** (top scores), applied before the
      federated filter: **no** -- faster-coco-eval only caps per (image, category) at
      ``maxDets[-1]``. :func:`limit_dets_per_image` applies the official cap here, and the
      per-(image, category) cap is then set to the same value so it never bites.
One small difference remains: faster-coco-eval derives a ground truth's ``ignore`` flag from
``iscrowd`` only, where the official code keeps an ``ignore`` field found in the annotation.
LVIS annotation files have neither field, so results are the same (checked against the official
evaluator in tests/test_coco_lvis_eval.py).
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster
from faster_coco_eval.core import mask as mask_api

__all__ = [
    "COCO_METRICS",
    "LVIS_METRICS",
    "LVIS_MAX_DETS",
    "load_gt",
    "limit_dets_per_image",
    "load_results",
    "run_cocoeval",
    "summarize_precision",
    "evaluate_coco_json",
]

logger = logging.getLogger(__name__)

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = COCO_METRICS + ("APr", "APc", "APf")
# The official LVIS value (LVISResults(max_dets=300)).
LVIS_MAX_DETS = 300
_IOU_TYPES = ("bbox", "segm")
_FREQUENCIES = ("r", "c", "f")

GtLike = Union[str, os.PathLike, dict, COCO]
ResultsLike = Union[str, os.PathLike, Sequence[dict]]


def load_gt(gt: GtLike) -> COCO:
    """Index ground truth for evaluation.

    Args:
        gt: annotation json path, annotation dict, or a ``faster_coco_eval.COCO`` (returned as is).

    Returns:
        a ``faster_coco_eval.COCO``. A dict input is copied one level into each annotation
        first, because evaluation adds keys (``ignore``, ``rle``) to annotation dicts and the
        caller's dict should stay untouched.
    """
    if isinstance(gt, COCO):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        return COCO(os.fspath(gt), print_function=logger.debug)
    if isinstance(gt, dict):
        data = dict(gt)
        data["annotations"] = [dict(a) for a in gt.get("annotations") or []]
        # convert_to_coco_dict writes "licenses": None and may omit "annotations"; neither
        # matters for evaluation.
        return COCO(data, print_function=logger.debug)
    raise TypeError(f"Unsupported ground truth type {type(gt)}")


def _load_results(results: ResultsLike) -> List[dict]:
    """Results as a list of fresh (shallow-copied) dicts, since load_results adds keys."""
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"Results must be a list of dicts, got {type(results)}")
    return [dict(r) for r in results]


def limit_dets_per_image(results: Sequence[dict], max_dets: int) -> List[dict]:
    """Keep the ``max_dets`` top-scoring detections of each image, over all categories.

    This is LVIS's rule (applied when results are loaded, so before federated filtering:
    detections of categories that are later ignored still take slots). Images are kept in
    first-appearance order; a capped image's detections are sorted by score (stable, so ties
    keep their input order), exactly reproducing the official ordering and tie-breaking.
    """
    per_image: Dict[int, List[dict]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    kept: List[dict] = []
    for dets in per_image.values():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        kept.extend(dets)
    return kept


def load_results(gt_api: COCO, results: List[dict], iou_type: str) -> COCO:
    """Index detections like ``COCO.loadRes``, with the mask work done in two batched calls.

    Same fields as pycocotools' loadRes gives them: ``id`` = position + 1, ``iscrowd`` = 0,
    ``area`` = box w * h for "bbox", mask area for "segm". For "segm" the area comes from the
    mask even when a detection has a "bbox" too: Detectron2 gets the same by dropping "bbox"
    before loadRes; the area decides the detection's small/medium/large range. A missing
    "bbox" of a mask detection is not derived from its mask: mask matching never reads it.
    loadRes calls the mask API once per detection, which cost about a fifth of a whole mask
    evaluation. ``results`` dicts are modified in place.
    """
    image_ids = set(gt_api.imgs)
    unknown = {r["image_id"] for r in results} - image_ids
    if unknown:
        raise ValueError(
            f"Results contain {len(unknown)} image ids that are not in the ground truth, "
            f"e.g. {sorted(unknown)[:5]}"
        )
    if iou_type == "segm" and results:
        rles = [r["segmentation"] for r in results]
        areas = mask_api.area(rles)
        for i, r in enumerate(results):
            r["area"] = float(areas[i])
    else:
        for r in results:
            r["area"] = float(r["bbox"][2]) * float(r["bbox"][3])
    for i, r in enumerate(results):
        r["id"] = i + 1
        r["iscrowd"] = 0

    dt_api = COCO(print_function=logger.debug)
    dt_api.dataset = {
        "images": list(gt_api.dataset.get("images", [])),
        "categories": list(gt_api.dataset.get("categories", [])),
        "annotations": results,
    }
    dt_api.createIndex()
    return dt_api


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    Indexing creates hundreds of thousands of dicts, which triggers repeated full collections
    that scan every live object; they made timings jump by up to 2x and free nothing here.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_cocoeval(
    gt_api: COCO,
    results: List[dict],
    iou_type: str,
    lvis: bool = False,
    max_dets: Optional[int] = None,
    iou_workers: int = 1,
) -> COCOeval_faster:
    """Run faster-coco-eval's evaluate + accumulate; ``results`` are modified in place.

    Args:
        gt_api: indexed ground truth.
        results: COCO results (fresh dicts the caller no longer needs).
        iou_type: "bbox" or "segm".
        lvis: use the LVIS protocol (federated, 300 per image, frequency groups).
        max_dets: COCO: the last of maxDets [1, 10, max_dets] (default 100), like Detectron2's
            ``max_dets_per_image``. LVIS: the per-image cap (default 300).
        iou_workers: threads for mask IoUs. One by default: each (image, category) pair takes
            tens of microseconds, so handing pairs to threads cost more than it saved (mask
            IoU of the 300-image benchmark on 2 cores: 0.037 s in one thread, 0.054 s in two).

    Returns:
        the evaluated ``COCOeval_faster``; ``.eval["precision"]`` has shape (T, R, K, A, M) for
        IoU thresholds, recall thresholds, categories (sorted ids), area ranges, maxDets.
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
    if lvis:
        cap = LVIS_MAX_DETS if max_dets is None else int(max_dets)
        results = limit_dets_per_image(results, cap)
        max_dets_list = [cap]
    else:
        max_dets_list = [1, 10, 100 if max_dets is None else int(max_dets)]

    with _gc_paused():
        dt_api = load_results(gt_api, results, iou_type)
        ev = COCOeval_faster(
            gt_api,
            dt_api,
            iouType=iou_type,
            lvis_style=lvis,
            print_function=logger.debug,
            rle_iou_max_workers=iou_workers,
        )
        ev.params.maxDets = max_dets_list
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean() * 100) if valid.size else float("nan")


def summarize_precision(
    ev: COCOeval_faster, lvis: bool = False, per_category: bool = False
) -> Dict[str, float]:
    """Detectron2-style metrics from an evaluated ``COCOeval_faster``.

    The means follow pycocotools' ``summarize`` (entries of -1, i.e. categories without valid
    ground truth, are left out) at the largest maxDets; they are computed here rather than read
    from ``ev.stats`` because the layout of that vector differs between faster-coco-eval
    versions and modes.

    Returns:
        {"AP", "AP50", "AP75", "APs", "APm", "APl"} (+ "APr", "APc", "APf" for LVIS)
        (+ "AP-<category name>" per category when ``per_category``), in percent.
    """
    p = ev.params
    precision = np.asarray(ev.eval["precision"])  # (T, R, K, A, M)
    iou_thrs = np.asarray(p.iouThrs)
    area_index = {label: i for i, label in enumerate(p.areaRngLbl)}
    a_all = area_index["all"]
    t50 = int(np.flatnonzero(np.isclose(iou_thrs, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(iou_thrs, 0.75))[0])
    last = precision[..., -1]  # largest maxDets -> (T, R, K, A)

    results = {
        "AP": _mean_valid(last[:, :, :, a_all]),
        "AP50": _mean_valid(last[t50, :, :, a_all]),
        "AP75": _mean_valid(last[t75, :, :, a_all]),
        "APs": _mean_valid(last[:, :, :, area_index["small"]]),
        "APm": _mean_valid(last[:, :, :, area_index["medium"]]),
        "APl": _mean_valid(last[:, :, :, area_index["large"]]),
    }
    cat_ids = [int(c) for c in p.catIds]
    cats = ev.cocoGt.cats
    if lvis:
        for freq in _FREQUENCIES:
            idx = [k for k, c in enumerate(cat_ids) if cats[c]["frequency"] == freq]
            results["AP" + freq] = _mean_valid(last[:, :, idx, a_all])
    if per_category:
        for k, c in enumerate(cat_ids):
            results["AP-" + str(cats[c]["name"])] = _mean_valid(last[:, :, k, a_all])
    return results


def evaluate_coco_json(
    gt: GtLike,
    results: ResultsLike,
    iou_type: str,
    lvis: bool = False,
    max_dets: Optional[int] = None,
    per_category: bool = False,
) -> Dict[str, float]:
    """COCO or LVIS AP of detections in COCO results format; usable without a model.

    Args:
        gt: ground truth (see :func:`load_gt`); pass a ``faster_coco_eval.COCO`` to reuse one.
        results: results json path or list of result dicts (not modified).
        iou_type: "bbox" or "segm".
        lvis: LVIS protocol (federated evaluation, per-image cap, APr/APc/APf).
        max_dets: see :func:`run_cocoeval` (defaults 100 for COCO, 300 for LVIS).
        per_category: also return "AP-<name>" for every category.

    Returns:
        metric name -> percent, keys as in :data:`COCO_METRICS` / :data:`LVIS_METRICS`.
        With no detections at all, every metric with ground truth is 0 (not NaN).
    """
    with _gc_paused():
        gt_api = load_gt(gt)
        results = _load_results(results)
    ev = run_cocoeval(gt_api, results, iou_type, lvis=lvis, max_dets=max_dets)
    return summarize_precision(ev, lvis=lvis, per_category=per_category)


def nan_to_none(x):
    """NaN -> None, recursively, so metric dicts serialise as valid json."""
    if isinstance(x, dict):
        return {k: nan_to_none(v) for k, v in x.items()}
    if isinstance(x, float) and math.isnan(x):
        return None
    return x
