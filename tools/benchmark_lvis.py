#!/usr/bin/env python
"""LVIS box / mask AP (overall and rare / common / frequent) of a Detectron2 model, with timings.

Either runs inference (``--config-file`` + ``--weights``) with :class:`FastLVISEvaluator`, or
evaluates an existing results file (``--results``, LVIS results json with dataset category ids,
e.g. the ``lvis_instances_results.json`` an evaluator wrote). Prints the AP table, inference
images/s (model time, data loading included) and evaluation seconds (loading the annotations
included), and writes them to ``--json``.

    python tools/benchmark_lvis.py --config-file F --weights W [--dataset lvis_v1_val]
                                   [--json OUT] [--output-dir DIR] [KEY VALUE ...]
    python tools/benchmark_lvis.py --results RES.json [--dataset NAME] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from tabulate import tabulate

import virtex_d2  # noqa: F401  (registers datasets and models)
from virtex_d2.evaluation import FastLVISEvaluator
from virtex_d2.evaluation.fast_cocoeval import LVIS_METRICS, evaluate_coco_json, load_gt, nan_to_none

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


def evaluate_results_file(dataset: str, results_path: str) -> Dict:
    """Evaluate an LVIS results json against ``dataset``'s annotations."""
    start = time.perf_counter()
    gt_api = load_gt(_ground_truth_file(dataset))
    with open(results_path) as f:
        results = json.load(f)
    tasks = ["bbox", "segm"] if any("segmentation" in r for r in results) else ["bbox"]
    report: Dict = {"num_images": len(gt_api.imgs), "num_detections": len(results)}
    for task in tasks:
        report[task] = evaluate_coco_json(gt_api, results, task, lvis=True)
    report["eval_seconds"] = time.perf_counter() - start
    return report


def run_inference(args: argparse.Namespace) -> Dict:
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
    report: Dict = {
        "num_images": evaluator.num_images,
        "device": str(cfg.MODEL.DEVICE),
        "inference_seconds": inference_seconds,
        "inference_images_per_s": evaluator.num_images / max(inference_seconds, 1e-9),
        "eval_seconds": evaluator.eval_seconds,
    }
    report.update(results)
    return report


def format_table(report: Dict) -> str:
    rows = [[task] + [report[task][m] for m in LVIS_METRICS]
            for task in ("bbox", "segm") if task in report]
    return tabulate(rows, headers=["task"] + list(LVIS_METRICS), floatfmt=".2f", tablefmt="pipe")


def main(argv: Optional[List[str]] = None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", help="model config (inference mode)")
    parser.add_argument("--weights", help="model checkpoint (inference mode)")
    parser.add_argument("--results", help="evaluate this LVIS results json instead of a model")
    parser.add_argument("--dataset", default="lvis_v1_val", help="registered LVIS dataset")
    parser.add_argument("--json", help="write the report here")
    parser.add_argument("--output-dir", help="inference mode: where the evaluator writes results")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    args = parser.parse_args(argv)

    if args.results:
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(nan_to_none(report), f, indent=2)
    return report


if __name__ == "__main__":
    main()
