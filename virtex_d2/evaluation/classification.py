"""Top-k accuracy of single-label classifiers, gathered over all processes."""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from detectron2.data import MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

__all__ = ["ClassificationEvaluator", "RESULTS_FILE_NAME"]

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "classification_results.json"


class ClassificationEvaluator(DatasetEvaluator):
    """Top-1 / top-5 accuracy (percent) of outputs ``{"logits": (K,) tensor}`` against the
    inputs' ``"label"``.

    ``evaluate`` returns ``OrderedDict({"classification": {"top1": ..., "top5": ...}})`` on the
    main process and ``{}`` elsewhere. A k not smaller than the number of classes would always
    score 100%, so it is skipped (and logged).
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        distributed: bool = True,
        topk: Sequence[int] = (1, 5),
    ):
        """
        Args:
            dataset_name: registered dataset; its ``thing_classes`` (if known) name the classes.
            output_dir: if given, metrics go to ``classification_results.json`` and per-image
                top-k predictions to ``classification_predictions.json`` there.
            distributed: gather predictions of all processes on the main one.
            topk: the k of the reported top-k accuracies.
        """
        if not topk or min(topk) < 1:
            raise ValueError(f"topk must be positive integers, got {topk}")
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._topk = tuple(sorted(set(int(k) for k in topk)))
        self._predictions: list[dict[str, Any]] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> None:
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            if "label" not in inp:
                raise KeyError(
                    f"input {inp.get('file_name', inp.get('image_id'))} of '{self._dataset_name}' "
                    "has no 'label'; the evaluator needs ground-truth classes"
                )
            logits = out["logits"].detach().float().cpu()
            k = min(max(self._topk), logits.numel())
            self._predictions.append(
                {
                    "image_id": inp.get("image_id"),
                    "label": int(inp["label"]),
                    # Only the top-k indices are kept: full logits of 50K x 1000 would be large.
                    "topk": logits.topk(k).indices.tolist(),
                    "num_classes": logits.numel(),
                }
            )

    def evaluate(self):
        predictions = self._predictions
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = [p for part in gathered for p in part]
        if not predictions:
            logger.warning(f"[ClassificationEvaluator] no predictions for '{self._dataset_name}'")
            return {}
        num_classes = {p["num_classes"] for p in predictions}
        if len(num_classes) != 1:
            raise ValueError(f"outputs disagree on the number of classes: {sorted(num_classes)}")
        (num_classes,) = num_classes
        classes = MetadataCatalog.get(self._dataset_name).get("thing_classes", None)
        if classes is not None and len(classes) != num_classes:
            raise ValueError(
                f"the model predicts {num_classes} classes but '{self._dataset_name}' has "
                f"{len(classes)}"
            )
        ks = [k for k in self._topk if k < num_classes]
        skipped = [k for k in self._topk if k >= num_classes]
        if skipped:
            logger.info(f"top-{skipped} skipped: only {num_classes} classes")
        metrics: dict[str, float] = {}
        for k in ks:
            hits = sum(p["label"] in p["topk"][:k] for p in predictions)
            metrics[f"top{k}"] = 100.0 * hits / len(predictions)
        logger.info(
            f"Classification on '{self._dataset_name}' ({len(predictions)} images): "
            + ", ".join(f"{m} {v:.2f}" for m, v in metrics.items())
        )
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            summary = {"dataset": self._dataset_name, "num_images": len(predictions), **metrics}
            with open(os.path.join(self._output_dir, RESULTS_FILE_NAME), "w") as f:
                json.dump(summary, f, indent=2)
            with open(os.path.join(self._output_dir, "classification_predictions.json"), "w") as f:
                json.dump(
                    [{k: p[k] for k in ("image_id", "label", "topk")} for p in predictions], f
                )
        return OrderedDict({"classification": metrics})
