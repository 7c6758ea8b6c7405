"""COCO and LVIS instance AP from COCO-format json, computed with hotcoco.

This is the model-free half of :mod:`virtex_d2.evaluation.coco_lvis`: it takes ground truth and
detections in COCO results format and returns Detectron2-style metric dicts. The matching,
accumulation and LVIS bookkeeping run in hotcoco (Rust, pycocotools-compatible, with an LVIS
mode), the fastest of the exact evaluators measured by ``tools/benchmarks/benchmark_eval.py``.

Formats:
    ground truth: a COCO / LVIS annotation file (path), the same as a dict, or an already
        indexed ``hotcoco.COCO``. LVIS images carry ``neg_category_ids`` and
        ``not_exhaustive_category_ids``; LVIS categories carry ``frequency`` in {"r", "c", "f"}.
    results: a json path or a list of dicts ``{"image_id": int, "category_id": int (dataset id),
        "score": float, "bbox": [x, y, w, h] (absolute XYWH), "segmentation": RLE with str
        counts}``, as written by ``detectron2.evaluation.coco_evaluation.instances_to_coco_json``.
    metrics: percent (x100) floats; NaN where no category has a valid ground truth in the slice.

LVIS protocol (official ``lvis`` package, LVISResults + LVISEval) and how it is done here:
    - at most 300 detections **per image across categories** (top scores, ties in input
      order), applied before the federated filter: ``hotcoco.LVISResults(gt, res, max_dets)``
      (the same rule as :func:`limit_dets_per_image`);
    - federated filtering of detections to each image's positive + negative categories, and
      unmatched detections of a ``not_exhaustive_category_ids`` category ignored:
      ``COCOeval(..., lvis_style=True)``;
    - APr / APc / APf from category ``frequency``: :func:`summarize_precision`.
All of it is checked against the official evaluator in tests/evaluation/test_coco_lvis_eval.py.

faster-coco-eval, which did this before, is no longer used here: hotcoco covers every piece
(COCO and LVIS matching, the per-image LVIS cap, mask areas), so it stays only as the middle
column of ``tools/benchmarks/benchmark_eval.py``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Union

import hotcoco
import numpy as np

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

GtLike = Union[str, os.PathLike, dict, hotcoco.COCO]
ResultsLike = Union[str, os.PathLike, Sequence[dict]]


def load_gt(gt: GtLike) -> hotcoco.COCO:
    """Index ground truth for evaluation.

    Args:
        gt: annotation json path, annotation dict, or a ``hotcoco.COCO`` (returned as is).

    Returns:
        a ``hotcoco.COCO``. It holds its own (Rust) copy of the data, so a dict passed in is
        never modified.
    """
    if isinstance(gt, hotcoco.COCO):
        return gt
    if isinstance(gt, (str, os.PathLike)):
        try:
            return hotcoco.COCO(os.fspath(gt))  # parsed in Rust: much faster than json.load
        except ValueError:
            # e.g. Detectron2's convert_to_coco_json writes "licenses": null, which hotcoco's
            # reader rejects; read it in Python and clean it up below.
            with open(gt) as f:
                gt = json.load(f)
    if isinstance(gt, dict):
        # convert_to_coco_dict writes "licenses": None and may omit "annotations"; neither
        # matters for evaluation, and hotcoco wants lists where it finds the keys.
        data = {k: v for k, v in gt.items() if v is not None}
        data.setdefault("annotations", [])
        return hotcoco.COCO(data)
    raise TypeError(f"Unsupported ground truth type {type(gt)}")


def _load_results(results: ResultsLike) -> list[dict]:
    if isinstance(results, (str, os.PathLike)):
        with open(results) as f:
            results = json.load(f)
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"Results must be a list of dicts, got {type(results)}")
    return list(results)


def limit_dets_per_image(results: Sequence[dict], max_dets: int) -> list[dict]:
    """Keep the ``max_dets`` top-scoring detections of each image, over all categories.

    LVIS's rule, in Python, for callers that want the capped list itself; evaluation applies
    the same rule inside hotcoco (``LVISResults``). Images are kept in first-appearance order; a
    capped image's detections are sorted by score (stable, so ties keep their input order).
    """
    per_image: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        per_image[r["image_id"]].append(r)
    kept: list[dict] = []
    for dets in per_image.values():
        if len(dets) > max_dets:
            dets = sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
        kept.extend(dets)
    return kept


def load_results(
    gt_api: hotcoco.COCO, results: Sequence[dict], iou_type: str, lvis_cap: int | None = None
) -> hotcoco.COCO:
    """Index detections like pycocotools' ``loadRes``, as Detectron2 prepares them.

    For "segm" each detection's "bbox" is left out (shallow copies; the caller's dicts stay as
    they are), so its area, which decides the small/medium/large range, comes from the mask:
    Detectron2's COCOEvaluator and LVISEvaluator do the same. ``lvis_cap``: keep only each
    image's ``lvis_cap`` top-scoring detections over all categories (LVIS).
    """
    if iou_type not in _IOU_TYPES:
        raise ValueError(f"iou_type must be one of {_IOU_TYPES}, got {iou_type!r}")
    # hotcoco only warns about unknown images; a results file for another split must fail.
    unknown = {r["image_id"] for r in results} - set(gt_api.get_img_ids())
    if unknown:
        raise ValueError(
            f"Results contain {len(unknown)} image ids that are not in the ground truth, "
            f"e.g. {sorted(unknown)[:5]}"
        )
    if iou_type == "segm":
        results = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    else:
        results = list(results)
    if lvis_cap is not None:
        return hotcoco.LVISResults(gt_api, results, max_dets=int(lvis_cap))
    return gt_api.load_res(results)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector.

    Reading json and copying detections creates hundreds of thousands of dicts, which triggers
    repeated full collections that scan every live object; they made timings jump by up to 2x
    and free nothing here.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def run_cocoeval(
    gt_api: hotcoco.COCO,
    results: Sequence[dict],
    iou_type: str,
    lvis: bool = False,
    max_dets: int | None = None,
) -> hotcoco.COCOeval:
    """Run hotcoco's evaluate + accumulate. ``results`` are not modified.

    Args:
        gt_api: indexed ground truth.
        results: COCO results.
        iou_type: "bbox" or "segm".
        lvis: use the LVIS protocol (federated, 300 per image, frequency groups).
        max_dets: COCO: the last of maxDets [1, 10, max_dets] (default 100), like Detectron2's
            ``max_dets_per_image``. LVIS: the per-image cap (default 300).

    Returns:
        the evaluated ``hotcoco.COCOeval``; ``.eval["precision"]`` has shape (T, R, K, A, M) for
        IoU thresholds, recall thresholds, categories (sorted ids), area ranges, maxDets.
    """
    if lvis:
        cap = LVIS_MAX_DETS if max_dets is None else int(max_dets)
        max_dets_list = [cap]
    else:
        cap = None
        max_dets_list = [1, 10, 100 if max_dets is None else int(max_dets)]

    with _gc_paused():
        dt_api = load_results(gt_api, results, iou_type, lvis_cap=cap)
        ev = hotcoco.COCOeval(gt_api, dt_api, iou_type, lvis_style=lvis)
        # The per-(image, category) cap; for LVIS it equals the per-image cap, so it never
        # removes anything the per-image cap kept (the official evaluator has no such cap).
        ev.params.maxDets = max_dets_list
        ev.evaluate()
        ev.accumulate()
    return ev


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean() * 100) if valid.size else float("nan")


def summarize_precision(
    ev: hotcoco.COCOeval, lvis: bool = False, per_category: bool = False
) -> dict[str, float]:
    """Detectron2-style metrics from an evaluated ``hotcoco.COCOeval``.

    The means follow pycocotools' ``summarize`` (entries of -1, i.e. categories without valid
    ground truth, are left out) at the largest maxDets; they are computed from the precision
    array rather than by ``summarize()``, which prints, and so that per-category and
    frequency-group means come from the same array.

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
    if lvis or per_category:
        cats = ev.cocoGt.cats  # a fresh dict on every access: read it once
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
    max_dets: int | None = None,
    per_category: bool = False,
) -> dict[str, float]:
    """COCO or LVIS AP of detections in COCO results format; usable without a model.

    Args:
        gt: ground truth (see :func:`load_gt`); pass a ``hotcoco.COCO`` to reuse one.
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
