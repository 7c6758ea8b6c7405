"""COCO and LVIS instance detection / segmentation evaluators backed by hotcoco.

Drop-in counterparts of Detectron2's ``COCOEvaluator`` and ``LVISEvaluator`` (same
reset/process/evaluate contract, same result keys) that do the AP computation in hotcoco's Rust
code instead of pycocotools' Python loops or the ``lvis`` package (whose evaluator no longer
runs on numpy >= 1.24). Metric definitions: :mod:`.fast_cocoeval`.

Results of ``evaluate()`` on the main process (other ranks return ``{}``)::

    OrderedDict(bbox={"AP": .., "AP50": .., "AP75": .., "APs": .., "APm": .., "APl": ..,
                      # COCO: "AP-<class>" per category; LVIS: "APr", "APc", "APf"
                      },
                segm={...})   # only when predictions have masks

All values in percent; NaN where nothing could be measured.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence

import torch
from detectron2.data import MetadataCatalog
from detectron2.data.datasets.coco import convert_to_coco_dict, convert_to_coco_json
from detectron2.evaluation import DatasetEvaluator
from detectron2.evaluation.coco_evaluation import instances_to_coco_json
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table
from hotcoco import COCO
from tabulate import tabulate

from .fast_cocoeval import evaluate_coco_json, load_gt

__all__ = ["FastCOCOEvaluator", "FastLVISEvaluator"]

_SUPPORTED_TASKS = ("bbox", "segm")


class FastCOCOEvaluator(DatasetEvaluator):
    """COCO box / mask AP with hotcoco (numbers equal pycocotools' COCOeval).

    Ground truth comes from the dataset metadata's ``json_file``; datasets without one are
    converted with Detectron2's ``convert_to_coco_json`` (cached in ``output_dir``) or, without
    an ``output_dir``, ``convert_to_coco_dict`` in memory. It is loaded lazily on the process
    that evaluates, so other ranks never read it.
    """

    _lvis = False
    _results_file = "coco_instances_results.json"

    def __init__(
        self,
        dataset_name: str,
        tasks: Sequence[str] | None = None,
        distributed: bool = True,
        output_dir: str | None = None,
        *,
        max_dets_per_image: int | None = None,
    ):
        """
        Args:
            dataset_name: a dataset registered in MetadataCatalog.
            tasks: subset of ("bbox", "segm"); default: inferred from the predictions.
            distributed: gather predictions from all ranks and evaluate on rank 0.
            output_dir: where to write the results json (and a converted ground truth json).
            max_dets_per_image: COCO: maxDets become [1, 10, this] (default 100);
                LVIS: per-image cap over all categories (default 300).
        """
        if tasks is not None:
            unknown = set(tasks) - set(_SUPPORTED_TASKS)
            if unknown:
                raise ValueError(f"Unsupported tasks {sorted(unknown)}; use {_SUPPORTED_TASKS}")
        self._dataset_name = dataset_name
        self._tasks = tuple(tasks) if tasks is not None else None
        self._distributed = distributed
        self._output_dir = output_dir
        self._max_dets = max_dets_per_image
        self._metadata = MetadataCatalog.get(dataset_name)
        self._logger = logging.getLogger(__name__)
        self._gt_api: COCO | None = None
        self._predictions: list[dict] = []

    # --- DatasetEvaluator interface -----------------------------------------------------------

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """
        Args:
            inputs: model inputs; each dict has "image_id".
            outputs: model outputs; each dict has "instances" (``Instances`` with pred_boxes,
                scores, pred_classes (contiguous ids) and optionally pred_masks (N, H, W)).
        """
        for inp, out in zip(inputs, outputs):
            if "instances" not in out:
                continue
            instances = out["instances"].to(torch.device("cpu"))
            self._predictions.append(
                {
                    "image_id": inp["image_id"],
                    "instances": instances_to_coco_json(instances, inp["image_id"]),
                }
            )

    def evaluate(self) -> OrderedDict[str, dict[str, float]]:
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return OrderedDict()
            predictions = list(itertools.chain(*gathered))
        else:
            predictions = self._predictions

        if len(predictions) == 0:
            self._logger.warning(f"[{type(self).__name__}] Did not receive valid predictions.")
            return OrderedDict()

        # Sorting by image makes the order of detections (which decides ties between equal
        # scores) the same whatever the number of processes and their sharding.
        predictions = sorted(predictions, key=lambda p: p["image_id"])
        # Copies, so that evaluating twice does not map the stored ids twice.
        results = [dict(r) for p in predictions for r in p["instances"]]
        self._to_dataset_category_ids(results)

        if self._output_dir:
            PathManager.mkdirs(self._output_dir)
            path = os.path.join(self._output_dir, self._results_file)
            self._logger.info(f"Saving results to {path}")
            with PathManager.open(path, "w") as f:
                json.dump(results, f)

        gt_api = self._ground_truth()
        if not gt_api.get_ann_ids():
            # Test-set annotation files have no annotations: results go to a server.
            self._logger.info("Annotations are not available for evaluation.")
            return OrderedDict()

        tasks = self._tasks or self._tasks_from_results(results)
        out: OrderedDict[str, dict[str, float]] = OrderedDict()
        for task in sorted(tasks):
            metrics = evaluate_coco_json(
                gt_api,
                results,
                task,
                lvis=self._lvis,
                max_dets=self._max_dets,
                per_category=not self._lvis,
            )
            self._log_metrics(task, metrics)
            out[task] = metrics
        return copy.deepcopy(out)

    # --- helpers --------------------------------------------------------------------------------

    @staticmethod
    def _tasks_from_results(results: list[dict]) -> tuple:
        if any("segmentation" in r for r in results):
            return ("bbox", "segm")
        return ("bbox",)

    def _to_dataset_category_ids(self, results: list[dict]) -> None:
        """Contiguous training ids -> the ids used in the annotation json, in place."""
        mapping = self._metadata.get("thing_dataset_id_to_contiguous_id")
        if mapping is None:
            # A dataset converted by convert_to_coco_dict without a mapping keeps contiguous ids.
            return
        reverse = {v: k for k, v in mapping.items()}
        for r in results:
            if r["category_id"] not in reverse:
                raise ValueError(
                    f"Predicted class {r['category_id']} is not in dataset "
                    f"'{self._dataset_name}' ({len(reverse)} classes)"
                )
            r["category_id"] = reverse[r["category_id"]]

    def _ground_truth(self) -> COCO:
        if self._gt_api is not None:
            return self._gt_api
        json_file = self._metadata.get("json_file")
        if json_file is None:
            if self._lvis:
                raise ValueError(
                    f"LVIS dataset '{self._dataset_name}' has no metadata 'json_file': LVIS "
                    "evaluation needs its neg_category_ids / not_exhaustive_category_ids / "
                    "frequency fields, which a converted dataset does not have."
                )
            if self._output_dir:
                json_file = os.path.join(self._output_dir, f"{self._dataset_name}_coco_format.json")
                convert_to_coco_json(self._dataset_name, json_file)
            else:
                self._gt_api = load_gt(convert_to_coco_dict(self._dataset_name))
                return self._gt_api
        self._gt_api = load_gt(PathManager.get_local_path(json_file))
        return self._gt_api

    def _log_metrics(self, task: str, metrics: dict[str, float]) -> None:
        summary = {k: v for k, v in metrics.items() if not k.startswith("AP-")}
        self._logger.info(
            f"Evaluation results for {task} on {self._dataset_name}:\n"
            + create_small_table(summary)
        )
        per_cat = [(k[3:], v) for k, v in metrics.items() if k.startswith("AP-")]
        if per_cat:
            # Three (category, AP) pairs per row keeps 80 classes readable in a log.
            flat = list(itertools.chain(*per_cat))
            rows = itertools.zip_longest(*[flat[i::6] for i in range(6)])
            table = tabulate(rows, headers=["category", "AP"] * 3, tablefmt="pipe", floatfmt=".3f")
            self._logger.info(f"Per-category {task} AP:\n" + table)


class FastLVISEvaluator(FastCOCOEvaluator):
    """LVIS box / mask AP (official protocol) with hotcoco.

    Federated evaluation over each image's positive and negative categories, no penalty for
    unmatched detections of not-exhaustively annotated categories, the 300 top-scoring
    detections per image, and APr / APc / APf by category frequency. Predicted contiguous ids
    map back with the dataset's ``thing_dataset_id_to_contiguous_id`` when it has one (COCO
    categories in LVIS format), else by +1 (LVIS ids are 1-based), as Detectron2 does.
    """

    _lvis = True
    _results_file = "lvis_instances_results.json"

    def _to_dataset_category_ids(self, results: list[dict]) -> None:
        if self._metadata.get("thing_dataset_id_to_contiguous_id") is not None:
            super()._to_dataset_category_ids(results)
            return
        for r in results:
            r["category_id"] += 1
