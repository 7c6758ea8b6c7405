"""
Detectron2 evaluator for image captioning, backed by the official COCO caption toolkit.

Ground truth comes from the registered dataset's records (``DatasetCatalog.get(name)``), each
of which carries ``"image_id"`` and ``"captions": [str, ...]``, so any registered caption
dataset can be evaluated. Scores are in percent; see :mod:`.caption_metrics`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import OrderedDict
from collections.abc import Hashable, Sequence

from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from .caption_metrics import score_captions

__all__ = ["CaptioningEvaluator", "RESULTS_FILE_NAME"]

logger = logging.getLogger(__name__)

RESULTS_FILE_NAME = "captions_results.json"


class CaptioningEvaluator(DatasetEvaluator):
    """
    Collect one predicted caption per image and score them with BLEU, METEOR, ROUGE-L, CIDEr
    (and SPICE when installed).

    ``process`` expects the model inputs to carry ``"image_id"`` and the outputs
    ``"caption": str``. ``evaluate`` returns ``OrderedDict({"captioning": {metric: percent}})``
    on the main process and ``{}`` on the others. Metrics that could not run are logged, not
    returned, because Detectron2's EvalHook requires every returned value to be a float.
    """

    def __init__(
        self,
        dataset_name: str,
        output_dir: str | None = None,
        distributed: bool = True,
        metrics: Sequence[str] | None = None,
    ):
        """
        Args:
            dataset_name: a name registered in ``DatasetCatalog`` whose records have
                ``"image_id"`` and ``"captions"``.
            output_dir: if given, predictions are written there as ``captions_results.json``
                (COCO caption-results format: ``[{"image_id": ..., "caption": ...}, ...]``).
            distributed: gather predictions from all processes to the main one.
            metrics: metric names to compute (see ``caption_metrics.METRIC_NAMES``); None = all.
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._metrics = None if metrics is None else list(metrics)
        self._predictions: list[dict] = []

    def reset(self) -> None:
        self._predictions = []

    def process(self, inputs: list[dict], outputs: list[dict]) -> None:
        """
        Args:
            inputs: dataset dicts given to the model; each has ``"image_id"``.
            outputs: model outputs, one per input; each has ``"caption": str``.
        """
        if len(inputs) != len(outputs):
            raise ValueError(f"{len(inputs)} inputs but {len(outputs)} outputs")
        for inp, out in zip(inputs, outputs):
            self._predictions.append({"image_id": inp["image_id"], "caption": out["caption"]})

    def _ground_truth(self) -> dict[Hashable, list[str]]:
        """image_id -> reference captions, in dataset order."""
        gts: dict[Hashable, list[str]] = {}
        for record in DatasetCatalog.get(self._dataset_name):
            if "captions" not in record:
                raise KeyError(
                    f"Dataset '{self._dataset_name}' records have no 'captions' field; "
                    "CaptioningEvaluator needs caption ground truth"
                )
            image_id = record["image_id"]
            if image_id in gts:
                raise ValueError(
                    f"Dataset '{self._dataset_name}' has image_id {image_id!r} twice; "
                    "captions must be grouped into one record per image"
                )
            gts[image_id] = list(record["captions"])
        return gts

    def _unique_predictions(self, predictions: list[dict]) -> dict[Hashable, str]:
        results: dict[Hashable, str] = {}
        repeated = 0
        for pred in predictions:
            image_id, caption = pred["image_id"], pred["caption"]
            if image_id in results:
                # A sampler that pads the last batch may show an image twice; the model is
                # deterministic at eval time, so the two captions must agree.
                if results[image_id] != caption:
                    raise ValueError(
                        f"Image {image_id!r} got two different captions: "
                        f"{results[image_id]!r} and {caption!r}"
                    )
                repeated += 1
                continue
            results[image_id] = caption
        if repeated:
            logger.warning("Ignored %d repeated predictions of the same image.", repeated)
        return results

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            gathered = comm.gather(self._predictions, dst=0)
            if not comm.is_main_process():
                return {}
            predictions = [p for per_rank in gathered for p in per_rank]
        else:
            predictions = self._predictions

        if not predictions:
            logger.warning("[CaptioningEvaluator] Did not receive valid predictions.")
            return {}

        results = self._unique_predictions(predictions)
        if self._output_dir:
            os.makedirs(self._output_dir, exist_ok=True)
            path = os.path.join(self._output_dir, RESULTS_FILE_NAME)
            with open(path, "w") as f:
                json.dump([{"image_id": i, "caption": c} for i, c in results.items()], f)
            logger.info("Wrote %d caption predictions to %s", len(results), path)

        gts = self._ground_truth()
        result = score_captions(gts, results, metrics=self._metrics, allow_subset=True)
        logger.info(
            "Caption metrics on %d of %d images of '%s' (percent): %s",
            result.num_images,
            len(gts),
            self._dataset_name,
            ", ".join(f"{k} {v:.2f}" for k, v in result.scores.items()),
        )
        if result.num_images < len(gts):
            logger.info("Only a subset was scored: CIDEr differs from a full-split evaluation.")
        return OrderedDict({"captioning": dict(result.scores)})
