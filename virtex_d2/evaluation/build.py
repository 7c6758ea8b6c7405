"""The one place that picks an evaluator, by the dataset's ``evaluator_type``."""

from __future__ import annotations

import os

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators


def _instance_tasks(cfg) -> tuple:
    # From the model, not the predictions: a model that detects nothing must still report
    # (zero) mask AP rather than silently dropping the task.
    return ("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",)


def _coco(cfg, name, out):
    from .coco_lvis import FastCOCOEvaluator

    return FastCOCOEvaluator(name, tasks=_instance_tasks(cfg), output_dir=out, distributed=True)


def _lvis(cfg, name, out):
    from .coco_lvis import FastLVISEvaluator

    return FastLVISEvaluator(name, tasks=_instance_tasks(cfg), output_dir=out, distributed=True)


def _captioning(cfg, name, out):
    from .captioning import CaptioningEvaluator

    return CaptioningEvaluator(name, output_dir=out, distributed=True)


def _pascal_voc(cfg, name, out):
    from detectron2.evaluation import PascalVOCDetectionEvaluator

    return PascalVOCDetectionEvaluator(name)


def _classification(cfg, name, out):
    from .classification import ClassificationEvaluator

    return ClassificationEvaluator(
        name, output_dir=out, distributed=True, topk=tuple(cfg.TEST.CLASSIFICATION.TOPK)
    )


EVALUATORS = {
    "coco": _coco,
    "lvis": _lvis,
    "captioning": _captioning,
    "pascal_voc": _pascal_voc,
    "classification": _classification,
}


def build_evaluator(cfg, dataset_name: str, output_folder: str | None = None) -> DatasetEvaluator:
    """Evaluator for ``dataset_name`` chosen by its metadata's ``evaluator_type``."""
    if output_folder is None:
        output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
    kind = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if dataset_name.startswith("synthetic_"):
        # Generated on first load; evaluators read the json files when they are built.
        DatasetCatalog.get(dataset_name)
    if kind not in EVALUATORS:
        raise ValueError(
            f"dataset {dataset_name!r} has evaluator_type {kind!r}; virtex_d2 evaluates "
            f"{sorted(EVALUATORS)}. Register the dataset with one of them."
        )
    evaluator = EVALUATORS[kind](cfg, dataset_name, output_folder)
    return evaluator if not isinstance(evaluator, list) else DatasetEvaluators(evaluator)
