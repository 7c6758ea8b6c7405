#!/usr/bin/env python
"""Time our COCO evaluation (hotcoco) against faster-coco-eval and pycocotools on the same data.

By default a deterministic synthetic set of COCO val2017's size is generated in memory (5,000
images of 320x320 with polygon objects of all sizes and a few crowd regions, ~38,000 noisy
detections with boxes and RLE masks); or pass ``--gt GT.json --results RES.json``. Every
evaluator starts from the same in-memory json (reading files is not timed); each timed span
covers indexing the ground truth, loading the results, matching, accumulating and summarizing.
Seconds are the best of ``--repeat`` runs (single timings jump with other load).

Prints AP/AP50/AP75/APs/APm/APl of the three side by side, exits with 1 if faster-coco-eval or
ours differs from pycocotools by more than 1e-4 (in percent), and ends with the speed ratios
``pycocotools / ours`` and ``faster-coco-eval / ours`` per IoU type.

    python tools/benchmarks/benchmark_eval.py [--gt GT.json --results RES.json]
        [--iou-type bbox|segm]
        [--json OUT] [--num-images 5000] [--objects 2 6] [--false-positives 1 4] [--seed 0]
        [--repeat 3]

``--json``: ``{"num_images", "num_gt", "num_detections", "agree", "threads",
<iou type>: {"ours" | "faster-coco-eval" | "pycocotools": {"seconds", "AP", "AP50", ...},
"ratios": {...}}}``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import io
import json
import math
import os
import random
import sys
import time
from typing import Any, Callable

import numpy as np
import pycocotools.mask as mask_util
from faster_coco_eval import COCO as FastCOCO
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO as RefCOCO
from pycocotools.cocoeval import COCOeval as RefCOCOeval

from virtex_d2.evaluation.fast_cocoeval import COCO_METRICS, evaluate_coco_json, nan_to_none

TOLERANCE = 1e-4


# --- synthetic data ---------------------------------------------------------------------------


def _star_polygon(rng: random.Random, cx: float, cy: float, radius: float, size: int) -> list:
    """A random star-shaped polygon (flat [x0, y0, x1, y1, ...]) clipped to the image."""
    n = rng.randint(6, 12)
    coords = []
    for i in range(n):
        angle = 2 * math.pi * (i + rng.uniform(-0.3, 0.3)) / n
        r = radius * rng.uniform(0.6, 1.0)
        coords.append(min(max(cx + r * math.cos(angle), 0.0), size - 1.0))
        coords.append(min(max(cy + r * math.sin(angle), 0.0), size - 1.0))
    return coords


def _rle(polygon: list, size: int) -> dict:
    rle = mask_util.merge(mask_util.frPyObjects([polygon], size, size))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Uncompressed RLE (list counts, column-major, starting with a zero run), like COCO crowds."""
    flat = np.asfortranarray(mask).reshape(-1, order="F").astype(np.uint8)
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": list(mask.shape)}


def make_synthetic_coco(
    num_images: int = 300,
    size: int = 320,
    num_classes: int = 10,
    seed: int = 0,
    objects: tuple[int, int] = (5, 12),
    false_positives: tuple[int, int] = (4, 10),
) -> tuple[dict, list[dict]]:
    """Deterministic COCO ground truth and noisy detections derived from it.

    Each image has ``objects`` (inclusive range) ground-truth objects, each detected about
    1.2 times (misses and duplicates), and ``false_positives`` detections of nothing.

    Returns:
        (gt dict in COCO instances format, list of result dicts with "bbox" [x, y, w, h] and
        "segmentation" compressed RLE (str counts)). Objects span small, medium and large;
        about one image in ten also has a crowd region (uncompressed RLE, iscrowd=1).
    """
    rng = random.Random(seed)
    images, annotations, results = [], [], []
    categories = [{"id": c + 1, "name": f"class_{c + 1}"} for c in range(num_classes)]

    def add_detection(image_id: int, polygon: list, category: int, score: float) -> None:
        rle = _rle(polygon, size)
        x, y, w, h = (float(v) for v in mask_util.toBbox(rle))
        # Boxes get their own jitter on top of the mask's, so box and mask AP differ.
        jitter = [rng.gauss(0, 0.05) * w, rng.gauss(0, 0.05) * h]
        box = [x + jitter[0], y + jitter[1], w * rng.uniform(0.9, 1.1), h * rng.uniform(0.9, 1.1)]
        results.append(
            {
                "image_id": image_id,
                "category_id": category,
                "bbox": box,
                "score": score,
                "segmentation": rle,
            }
        )

    for image_id in range(1, num_images + 1):
        images.append(
            {"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.jpg"}
        )
        for _ in range(rng.randint(*objects)):
            radius = rng.choice([rng.uniform(5, 16), rng.uniform(18, 50), rng.uniform(56, 110)])
            cx, cy = rng.uniform(0, size), rng.uniform(0, size)
            poly = _star_polygon(rng, cx, cy, radius, size)
            category = rng.randint(1, num_classes)
            rle = _rle(poly, size)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "segmentation": [poly],
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
            copies = 1 if rng.random() < 0.9 else 0
            copies += 1 if rng.random() < 0.3 else 0  # duplicates become false positives
            for _ in range(copies):
                shift_x, shift_y = rng.gauss(0, 0.1) * radius, rng.gauss(0, 0.1) * radius
                noisy = [
                    min(
                        max(
                            v + (shift_x if i % 2 == 0 else shift_y) + rng.gauss(0, 0.05) * radius,
                            0.0,
                        ),
                        size - 1.0,
                    )
                    for i, v in enumerate(poly)
                ]
                label = category if rng.random() < 0.9 else rng.randint(1, num_classes)
                add_detection(image_id, noisy, label, rng.random())
        if image_id % 10 == 0:
            mask = np.zeros((size, size), dtype=np.uint8)
            x0, y0 = rng.randint(0, size // 2), rng.randint(0, size // 2)
            mask[y0 : y0 + size // 3, x0 : x0 + size // 3] = 1
            crowd_category = rng.randint(1, num_classes)
            rle = mask_util.encode(np.asfortranarray(mask))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": crowd_category,
                    "segmentation": _uncompressed_rle(mask),
                    "area": float(mask_util.area(rle)),
                    "bbox": [float(v) for v in mask_util.toBbox(rle)],
                    "iscrowd": 1,
                }
            )
            for _ in range(3):  # detections inside the crowd region are ignored, not FPs
                cx = x0 + rng.uniform(10, size // 3 - 10)
                cy = y0 + rng.uniform(10, size // 3 - 10)
                poly = _star_polygon(rng, cx, cy, 10, size)
                add_detection(image_id, poly, crowd_category, rng.random())
        for _ in range(rng.randint(*false_positives)):
            cx, cy, radius = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(5, 60)
            poly = _star_polygon(rng, cx, cy, radius, size)
            add_detection(image_id, poly, rng.randint(1, num_classes), rng.random() * 0.8)

    gt = {"images": images, "annotations": annotations, "categories": categories}
    return gt, results


# --- evaluation -------------------------------------------------------------------------------


def _private_copies(gt: dict, results: list[dict], iou_type: str) -> tuple[dict, list[dict]]:
    """Both libraries rewrite ground truth and result dicts in place: they get private copies,
    made before the clock starts; segm results lose their boxes, as Detectron2 sends them."""
    gt, results = copy.deepcopy(gt), copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    return gt, results


def _time_cocoeval(build: Callable[[], Any]) -> tuple[dict[str, float], float]:
    """Seconds of ``build()`` (index the ground truth, load the results, return a COCOeval-like
    object) plus its evaluate/accumulate/summarize, and the metrics of its ``stats``."""
    gc.collect()  # start from a clean heap, as run_ours does
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        ev = build()
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    seconds = time.perf_counter() - start
    metrics = {
        name: float(ev.stats[i] * 100) if ev.stats[i] >= 0 else float("nan")
        for i, name in enumerate(COCO_METRICS)
    }
    return metrics, seconds


def run_pycocotools(gt: dict, results: list[dict], iou_type: str) -> tuple[dict[str, float], float]:
    """pycocotools' COCOeval, set up as Detectron2's COCOEvaluator does. Returns (metrics, s)."""
    gt, results = _private_copies(gt, results, iou_type)

    def build():
        coco_gt = RefCOCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        return RefCOCOeval(coco_gt, coco_gt.loadRes(results), iou_type)

    return _time_cocoeval(build)


def run_faster_coco_eval(
    gt: dict, results: list[dict], iou_type: str
) -> tuple[dict[str, float], float]:
    """faster-coco-eval's COCOeval_faster, used as its README shows. Returns (metrics, s)."""
    gt, results = _private_copies(gt, results, iou_type)

    def build():
        coco_gt = FastCOCO(gt)
        return COCOeval_faster(
            coco_gt, coco_gt.loadRes(results), iou_type, print_function=lambda *a: None
        )

    return _time_cocoeval(build)


def run_ours(gt: dict, results: list[dict], iou_type: str) -> tuple[dict[str, float], float]:
    """virtex_d2's evaluate_coco_json (hotcoco). Returns (metrics, s)."""
    gc.collect()  # garbage left by the previous run should not be charged to this one
    start = time.perf_counter()
    metrics = evaluate_coco_json(gt, results, iou_type)
    return metrics, time.perf_counter() - start


EVALUATORS = {
    "ours": run_ours,
    "faster-coco-eval": run_faster_coco_eval,
    "pycocotools": run_pycocotools,
}


def _agree(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= TOLERANCE


def compare(gt: dict, results: list[dict], iou_type: str, repeat: int) -> tuple[dict, bool]:
    """Run the three evaluators ``repeat`` times each (interleaved, so load drifts hit all of
    them alike); print the table. Returns ({evaluator: {"seconds", metrics...}}, agree)."""
    best = {name: math.inf for name in EVALUATORS}
    metrics: dict[str, dict[str, float]] = {}
    for _ in range(repeat):
        for name, run in EVALUATORS.items():
            metrics[name], seconds = run(gt, results, iou_type)
            best[name] = min(best[name], seconds)
    names = list(EVALUATORS)
    print(f"\n{iou_type}: {'metric':<7}" + "".join(f"{n:>18}" for n in names))
    agree = True
    for m in COCO_METRICS:
        ref = metrics["pycocotools"][m]
        ok = all(_agree(metrics[n][m], ref) for n in names)
        agree &= ok
        print(
            f"      {m:<7}"
            + "".join(f"{metrics[n][m]:>18.4f}" for n in names)
            + ("" if ok else "   <-- differs")
        )
    print(
        f"      {'seconds':<7}"
        + "".join(f"{best[n]:>18.3f}" for n in names)
        + f"   (best of {repeat})"
    )
    report: dict = {n: {"seconds": best[n], **metrics[n]} for n in names}
    report["ratios"] = {
        "pycocotools/ours": best["pycocotools"] / best["ours"],
        "faster-coco-eval/ours": best["faster-coco-eval"] / best["ours"],
        "pycocotools/faster-coco-eval": best["pycocotools"] / best["faster-coco-eval"],
    }
    return report, agree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gt", help="COCO annotation json (default: generate synthetic data)")
    parser.add_argument("--results", help="COCO results json (with --gt)")
    parser.add_argument("--iou-type", choices=["bbox", "segm"], help="default: both if possible")
    parser.add_argument("--json", help="write metrics and timings here")
    parser.add_argument("--num-images", type=int, default=5000, help="synthetic images")
    parser.add_argument(
        "--objects",
        type=int,
        nargs=2,
        default=(2, 6),
        metavar=("MIN", "MAX"),
        help="synthetic ground-truth objects per image",
    )
    parser.add_argument(
        "--false-positives",
        type=int,
        nargs=2,
        default=(1, 4),
        metavar=("MIN", "MAX"),
        help="synthetic false positives per image",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument(
        "--repeat", type=int, default=3, help="time each evaluator this many times, keep the best"
    )
    args = parser.parse_args(argv)

    if bool(args.gt) != bool(args.results):
        parser.error("--gt and --results go together")
    if args.gt:
        with open(args.gt) as f:
            gt = json.load(f)
        with open(args.results) as f:
            results = json.load(f)
    else:
        gt, results = make_synthetic_coco(
            num_images=args.num_images,
            seed=args.seed,
            objects=tuple(args.objects),
            false_positives=tuple(args.false_positives),
        )
    if args.iou_type:
        iou_types = [args.iou_type]
    else:
        iou_types = ["segm", "bbox"] if any("segmentation" in r for r in results) else ["bbox"]

    # hotcoco parallelises over images with rayon (RAYON_NUM_THREADS, default all cores);
    # faster-coco-eval and pycocotools use one thread.
    threads = os.environ.get("RAYON_NUM_THREADS") or str(os.cpu_count())
    print(
        f"{len(gt['images'])} images, {len(gt['annotations'])} ground truth "
        f"({sum(a.get('iscrowd', 0) for a in gt['annotations'])} crowd), "
        f"{len(results)} detections; ours = hotcoco ({threads} threads)"
    )
    report: dict = {
        "num_images": len(gt["images"]),
        "num_gt": len(gt["annotations"]),
        "num_detections": len(results),
        "threads": threads,
    }
    all_agree = True
    lines = []
    for iou_type in iou_types:
        report[iou_type], agree = compare(gt, results, iou_type, args.repeat)
        all_agree &= agree
        r = report[iou_type]["ratios"]
        lines.append(f"{iou_type} {r['pycocotools/ours']:.1f}x / {r['faster-coco-eval/ours']:.1f}x")
    report["agree"] = all_agree
    if args.json:
        with open(args.json, "w") as f:
            json.dump(nan_to_none(report), f, indent=2)
    if not all_agree:
        print(f"\nERROR: the evaluators differ by more than {TOLERANCE} (percent)", file=sys.stderr)
    print("\nspeed-up of ours (pycocotools / ours, faster-coco-eval / ours): " + ", ".join(lines))
    return 0 if all_agree else 1


if __name__ == "__main__":
    sys.exit(main())
