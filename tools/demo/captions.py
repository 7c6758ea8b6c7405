"""The pretrained captioner in the report: captions of a few validation images, and the
grounding check of ``tools/check_grounding.py``."""

from __future__ import annotations

from collections.abc import Sequence

from detectron2.data import DatasetCatalog

DATASET = "synthetic_captions_val"


def caption_report(
    config: str, opts: Sequence[str], weights: str, count: int = 8, grounding_images: int = 48
) -> tuple[list[dict], dict]:
    """Loads the captioner once and returns (``count`` images of the validation split with
    their generated caption and a reference one, the grounding numbers on its first
    ``grounding_images`` images; see :mod:`virtex_d2.evaluation.grounding`)."""
    from virtex_d2.config import setup_cfg
    from virtex_d2.engine.predictor import CaptionPredictor
    from virtex_d2.evaluation.grounding import grounding_batches, measure_grounding

    predictor = CaptionPredictor(setup_cfg(config, opts), weights)
    records = DatasetCatalog.get(DATASET)[:count]
    results = predictor.caption_files(
        [r["file_name"] for r in records], batch_size=count, num_workers=0, progress=False
    )
    generated = {c["file_name"]: c["caption"] for c in results.captions}
    captions = [
        {
            "file_name": r["file_name"],
            "caption": generated.get(r["file_name"], ""),
            "reference": r["captions"][0],
        }
        for r in records
    ]
    grounding = measure_grounding(
        predictor.model, grounding_batches(predictor.cfg, DATASET, grounding_images)
    )
    return captions, grounding.to_json()
