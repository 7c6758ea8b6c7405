#!/usr/bin/env python
"""LVIS box / mask AP (overall and rare / common / frequent) of a Detectron2 model, with timings.

Either runs inference (``--config-file`` + ``--weights``) with :class:`FastLVISEvaluator`, or
evaluates an existing results file (``--results``, LVIS results json with dataset category ids,
e.g. the ``lvis_instances_results.json`` an evaluator wrote). Prints the AP table, inference
images/s (model time, data loading included) and evaluation seconds (loading the annotations
included), and writes them to ``--json``.

    python tools/benchmarks/benchmark_lvis.py --config-file F --weights W [--dataset lvis_v1_val]
                                   [--json OUT] [--output-dir DIR] [KEY VALUE ...]
    python tools/benchmarks/benchmark_lvis.py --results RES.json [--dataset NAME] [--json OUT]
    python tools/benchmarks/benchmark_lvis.py --lvis-scale [--num-images 20000]
        [--dets-per-image 300]

``--lvis-scale`` measures the evaluator alone at LVIS v1 val's size: a synthetic LVIS-format
set (1,203 categories with LVIS v1's rare / common / frequent counts, ~12 objects, 8 verified
negative categories and some not-exhaustive ones per image) with 300 box detections per image,
evaluated in a fresh process that reports its wall time (indexing the ground truth to the
summary) and its peak RSS (``resource.getrusage``), before and after evaluating.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import os
import resource
import time

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from tabulate import tabulate

import virtex_d2  # noqa: F401  (registers datasets and models)
from virtex_d2.evaluation import FastLVISEvaluator
from virtex_d2.evaluation.fast_cocoeval import (
    LVIS_METRICS,
    evaluate_coco_json,
    load_gt,
    nan_to_none,
)

logger = logging.getLogger("benchmark_lvis")


class _TimedEvaluator(DatasetEvaluator):
    """Forwards to an evaluator and times its evaluate(), to split it from inference time."""

    def __init__(self, inner: DatasetEvaluator):
        self.inner = inner
        self.eval_seconds = 0.0
        self.num_images = 0

    def reset(self):
        self.num_images = 0
        self.inner.reset()

    def process(self, inputs, outputs):
        self.num_images += len(inputs)
        self.inner.process(inputs, outputs)

    def evaluate(self):
        start = time.perf_counter()
        results = self.inner.evaluate()
        self.eval_seconds = time.perf_counter() - start
        return results


class _ProgressLoader:
    """A data loader wrapper that draws a progress bar (inference_on_dataset only logs)."""

    def __init__(self, loader, desc: str):
        self.loader = loader
        self.desc = desc

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        from tqdm import tqdm

        yield from tqdm(self.loader, total=len(self.loader), desc=self.desc, unit="img")


def _ground_truth_file(dataset: str) -> str:
    """The dataset's annotation json; loads the dataset once if the file is not there yet,
    since some datasets (the synthetic ones) write it on first load."""
    json_file = MetadataCatalog.get(dataset).get("json_file")
    if json_file is None:
        raise SystemExit(f"Dataset '{dataset}' is not registered or has no 'json_file'")
    if not os.path.exists(json_file) and dataset in DatasetCatalog.list():
        try:
            DatasetCatalog.get(dataset)
        except (FileNotFoundError, OSError) as e:
            logger.info(f"Loading {dataset} failed: {e}")
    if not os.path.exists(json_file):
        raise SystemExit(f"Annotation file of '{dataset}' not found: {json_file}")
    return json_file


def evaluate_results_file(dataset: str, results_path: str) -> dict:
    """Evaluate an LVIS results json against ``dataset``'s annotations."""
    start = time.perf_counter()
    gt_api = load_gt(_ground_truth_file(dataset))
    with open(results_path) as f:
        results = json.load(f)
    tasks = ["bbox", "segm"] if any("segmentation" in r for r in results) else ["bbox"]
    report: dict = {"num_images": len(gt_api.imgs), "num_detections": len(results)}
    for task in tasks:
        report[task] = evaluate_coco_json(gt_api, results, task, lvis=True)
    report["eval_seconds"] = time.perf_counter() - start
    return report


def run_inference(args: argparse.Namespace) -> dict:
    """Build the model from the config, load weights, run inference + FastLVISEvaluator."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import inference_on_dataset
    from detectron2.modeling import build_model

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()

    _ground_truth_file(args.dataset)  # fail before building anything
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    loader = build_detection_test_loader(cfg, args.dataset)
    evaluator = _TimedEvaluator(
        FastLVISEvaluator(args.dataset, output_dir=args.output_dir, distributed=False)
    )
    start = time.perf_counter()
    results = inference_on_dataset(model, _ProgressLoader(loader, args.dataset), evaluator)
    total = time.perf_counter() - start
    inference_seconds = total - evaluator.eval_seconds
    report: dict = {
        "num_images": evaluator.num_images,
        "device": str(cfg.MODEL.DEVICE),
        "inference_seconds": inference_seconds,
        "inference_images_per_s": evaluator.num_images / max(inference_seconds, 1e-9),
        "eval_seconds": evaluator.eval_seconds,
    }
    report.update(results)
    return report


# LVIS v1's category counts by frequency (rare / common / frequent) and its val image size.
_LVIS_V1_FREQUENCIES = {"r": 337, "c": 461, "f": 405}
_WIDTH, _HEIGHT = 640, 480


def make_lvis_scale(num_images: int, dets_per_image: int, seed: int = 0) -> tuple:
    """A synthetic LVIS-format ground truth dict and box detections (``dets_per_image`` per
    image, a third near objects, the rest anywhere, with any category)."""
    rng = np.random.default_rng(seed)
    freqs = [f for f, n in _LVIS_V1_FREQUENCIES.items() for _ in range(n)]
    cats = [{"id": i + 1, "name": f"c{i + 1}", "frequency": f} for i, f in enumerate(freqs)]
    # Frequent categories appear in many images, rare ones in few.
    weight = np.array([{"r": 1.0, "c": 10.0, "f": 100.0}[f] for f in freqs])
    weight /= weight.sum()
    images, anns = [], []
    det_img, det_cat, det_box = [], [], []
    for image_id in range(1, num_images + 1):
        n = int(rng.integers(1, 25))
        gt_cats = rng.choice(len(cats), size=n, p=weight) + 1
        wh = np.exp(rng.uniform(np.log(6), np.log(400), size=(n, 2)))
        xy = rng.uniform(0, 1, size=(n, 2)) * ([_WIDTH, _HEIGHT] - wh).clip(0)
        boxes = np.concatenate([xy, wh], axis=1)
        present = sorted(set(gt_cats.tolist()))
        negatives = sorted(set(rng.choice(len(cats), 8, replace=False) + 1) - set(present))
        images.append(
            {
                "id": image_id,
                "width": _WIDTH,
                "height": _HEIGHT,
                "neg_category_ids": [int(c) for c in negatives],
                "not_exhaustive_category_ids": [c for c in present if rng.random() < 0.1],
            }
        )
        for c, (x, y, w, h) in zip(gt_cats.tolist(), boxes.tolist()):
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": c,
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]],
                }
            )
        near = dets_per_image // 3
        pick = rng.integers(0, n, size=near)
        jitter = rng.normal(0, 0.1, size=(near, 4)) * np.repeat(wh[pick], 2, axis=1)
        far_wh = np.exp(rng.uniform(np.log(6), np.log(400), size=(dets_per_image - near, 2)))
        far_xy = rng.uniform(0, 1, size=far_wh.shape) * ([_WIDTH, _HEIGHT] - far_wh).clip(0)
        det_box.append(np.concatenate([boxes[pick] + jitter, np.hstack([far_xy, far_wh])]))
        labels = np.where(
            rng.random(near) < 0.8, gt_cats[pick], rng.integers(1, len(cats) + 1, size=near)
        )
        det_cat.append(
            np.concatenate([labels, rng.integers(1, len(cats) + 1, dets_per_image - near)])
        )
        det_img.append(np.full(dets_per_image, image_id))
    box = np.concatenate(det_box)
    box[:, 2:] = box[:, 2:].clip(1)
    results = [
        {"image_id": i, "category_id": c, "bbox": b, "score": s}
        for i, c, b, s in zip(
            np.concatenate(det_img).tolist(),
            np.concatenate(det_cat).tolist(),
            box.tolist(),
            rng.random(len(box)).tolist(),
        )
    ]
    return {"images": images, "annotations": anns, "categories": cats}, results


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _lvis_scale_worker(num_images: int, dets_per_image: int, queue) -> None:
    at_start = _rss_mb()  # the interpreter with torch, detectron2 and hotcoco imported
    gt, results = make_lvis_scale(num_images, dets_per_image)
    before = {
        "rss_mb": _rss_mb(),
        "rss_mb_at_start": at_start,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    start = time.perf_counter()
    metrics = evaluate_coco_json(gt, results, "bbox", lvis=True)
    seconds = time.perf_counter() - start
    queue.put(
        {
            "num_images": len(gt["images"]),
            "num_gt": len(gt["annotations"]),
            "num_detections": len(results),
            "bbox": metrics,
            "eval_seconds": seconds,
            "inputs_in_memory": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    )


def lvis_scale(num_images: int, dets_per_image: int) -> dict:
    """Run :func:`_lvis_scale_worker` in a fresh process, so its peak RSS is its own."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_lvis_scale_worker, args=(num_images, dets_per_image, queue))
    proc.start()
    while True:
        try:
            report = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: still working
            if not proc.is_alive():
                raise SystemExit(f"the LVIS-scale run failed (exit code {proc.exitcode})")
    proc.join()
    return report


def format_table(report: dict) -> str:
    rows = [
        [task] + [report[task][m] for m in LVIS_METRICS]
        for task in ("bbox", "segm")
        if task in report
    ]
    return tabulate(rows, headers=["task"] + list(LVIS_METRICS), floatfmt=".2f", tablefmt="pipe")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", help="model config (inference mode)")
    parser.add_argument("--weights", help="model checkpoint (inference mode)")
    parser.add_argument("--results", help="evaluate this LVIS results json instead of a model")
    parser.add_argument("--dataset", default="lvis_v1_val", help="registered LVIS dataset")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--output-dir", help="inference mode: where the evaluator writes results")
    parser.add_argument(
        "--lvis-scale",
        action="store_true",
        help="time and peak RSS of the evaluator on a synthetic LVIS-sized set",
    )
    parser.add_argument("--num-images", type=int, default=20000, help="--lvis-scale images")
    parser.add_argument("--dets-per-image", type=int, default=300, help="--lvis-scale detections")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    if args.lvis_scale:
        report = lvis_scale(args.num_images, args.dets_per_image)
        report["mode"] = "lvis-scale"
        args.dataset = "synthetic LVIS-scale set"
    elif args.results:
        report = evaluate_results_file(args.dataset, args.results)
        report["mode"] = "results"
    else:
        if not (args.config_file and args.weights):
            parser.error("give --results, or --config-file and --weights")
        report = run_inference(args)
        report["mode"] = "inference"
    report["dataset"] = args.dataset

    print(f"LVIS AP on {args.dataset} ({report['num_images']} images):")
    print(format_table(report))
    if "inference_images_per_s" in report:
        print(
            f"inference: {report['num_images']} images in {report['inference_seconds']:.1f}s "
            f"= {report['inference_images_per_s']:.2f} images/s ({report['device']})"
        )
    print(f"evaluation: {report['eval_seconds']:.2f}s")
    if "peak_rss_mb" in report:
        print(
            f"{report['num_detections']} detections, {report['num_gt']} ground truth; peak RSS "
            f"{report['peak_rss_mb']:.0f} MB (with the inputs in memory, before evaluating: "
            f"{report['inputs_in_memory']['rss_mb']:.0f} MB; at start: "
            f"{report['inputs_in_memory']['rss_mb_at_start']:.0f} MB)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(nan_to_none(report), f, indent=2)
    return report


if __name__ == "__main__":
    main()
