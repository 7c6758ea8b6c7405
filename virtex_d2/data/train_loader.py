"""Build the resumable training loader from a config: load, clean and check the records first.

Used by ``engine.Trainer`` for pretraining (caption mapper), detection fine-tuning (Detectron2's
``DatasetMapper``) and classification (``classification_mapper``);
everything that can be found out before the first iteration is checked here, in the main process,
so that a broken annotation file stops the run with a message instead of a worker traceback.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.samplers import RepeatFactorTrainingSampler

from .resumable import ResumableTrainLoader, per_process_batch_and_seed
from .shards import is_webdataset_name
from .validation import (
    BadDataError,
    BadSampleTracker,
    check_image_files,
    clean_instance_annotations,
)

logger = logging.getLogger(__name__)

SUPPORTED_SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler")


def load_training_records(cfg) -> list[dict]:
    """``DATASETS.TRAIN`` as Detectron2 dataset dicts; a loader failure names the json files."""
    names = list(cfg.DATASETS.TRAIN)
    shards = [n for n in names if is_webdataset_name(n)]
    if shards:
        raise ValueError(
            f"DATASETS.TRAIN mixes WebDataset shards {shards} with other datasets, or uses them "
            "for a model other than VirTex pretraining: shards hold captioned images and are "
            "streamed only for MODEL.META_ARCHITECTURE VirTex, on their own (write a json "
            "dataset's images into shards with datasets/make_shards.py to combine them)"
        )
    unknown = [n for n in names if n not in DatasetCatalog.list()]
    if unknown:
        raise ValueError(
            f"DATASETS.TRAIN names {unknown}, which are not registered datasets; registered: "
            f"{sorted(DatasetCatalog.list())}"
        )
    try:
        return get_detection_dataset_dicts(
            names,
            filter_empty=False,  # done after cleaning, see clean_instance_annotations
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    except Exception as e:
        files = {n: getattr(MetadataCatalog.get(n), "json_file", "?") for n in names}
        raise BadDataError(
            f"loading the training dataset(s) {files} failed before training started: "
            f"{type(e).__name__}: {e}\nFix the annotation file (the message above names the "
            "problem), or regenerate it."
        ) from e


def repeat_factors(cfg, records: list[dict]) -> list[float] | None:
    """Per-record repeat factors of ``DATALOADER.SAMPLER_TRAIN`` (None: each record once)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return None
    if name == "RepeatFactorTrainingSampler":
        # Upstream main has a REPEAT_SQRT key (v0.6 always uses the square root).
        kwargs = {"sqrt": cfg.DATALOADER.REPEAT_SQRT} if "REPEAT_SQRT" in cfg.DATALOADER else {}
        factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            records, cfg.DATALOADER.REPEAT_THRESHOLD, **kwargs
        )
        return [float(f) for f in factors]
    raise ValueError(
        f"DATALOADER.SAMPLER_TRAIN {name!r} is not supported by virtex_d2's resumable training "
        f"loader; use one of {SUPPORTED_SAMPLERS}"
    )


def drop_unlabelled_for_multilabel(cfg, records: list[dict]) -> list[dict]:
    """Multilabel pretraining learns from images with at least one instance, as the reference
    does: an image without one has no target distribution (it would add a zero-loss row that
    still counts in the batch mean). Other tasks keep every record."""
    virtex = cfg.MODEL.get("VIRTEX")
    if virtex is None or virtex.TASK != "multilabel_classification":
        return records
    kept = [r for r in records if r.get("labels")]
    if len(kept) < len(records):
        logger.info(
            "multilabel_classification: dropped %d of %d training images that have no instance "
            "annotation",
            len(records) - len(kept),
            len(records),
        )
    return kept


def build_resumable_train_loader(
    cfg,
    mapper: Callable[[dict], Any],
    check_records: Callable[[Any, list[dict]], None] | None = None,
) -> ResumableTrainLoader:
    """The training loader of ``cfg`` with ``mapper``, after cleaning and checking the records.

    ``check_records(cfg, records)``: a task's own checks of the loaded records (it raises to stop
    the run), made here so that they fail before the first iteration rather than in a worker.
    """
    records = load_training_records(cfg)
    if check_records is not None:
        check_records(cfg, records)
    dataset_size = len(records)
    fraction = cfg.DATALOADER.VIRTEX_MAX_BAD_FRACTION
    records, _ = clean_instance_annotations(
        records, cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, require_mask=cfg.MODEL.MASK_ON
    )
    records = drop_unlabelled_for_multilabel(cfg, records)
    bad: dict[str, str] = {}
    if cfg.DATALOADER.VIRTEX_CHECK_FILES:
        records, bad = check_image_files(records, dataset_size, fraction)
    if not records:
        raise BadDataError(f"no usable training records left in {list(cfg.DATASETS.TRAIN)}")

    batch_size, seed = per_process_batch_and_seed(cfg)
    group_ids = None
    if cfg.DATALOADER.ASPECT_RATIO_GROUPING:
        sizeless = next((r for r in records if "width" not in r or "height" not in r), None)
        if sizeless is not None:
            raise ValueError(
                f"DATALOADER.ASPECT_RATIO_GROUPING needs width and height in every record; "
                f"{sizeless.get('file_name')} has none. Set it False for this dataset."
            )
        group_ids = [0 if r["width"] > r["height"] else 1 for r in records]
    return ResumableTrainLoader(
        records,
        mapper,
        batch_size=batch_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
        repeat_factors=repeat_factors(cfg, records),
        group_ids=group_ids,
        tracker=BadSampleTracker(dataset_size, fraction, initial=bad),
    )
