"""Captions of a few validation images by the pretrained model (for the report)."""
from __future__ import annotations

from typing import List, Sequence

import torch
from detectron2.data import DatasetCatalog


def caption_val_images(config: str, opts: Sequence[str], weights: str, count: int = 8,
                       dataset: str = "synthetic_captions_val") -> List[dict]:
    """``count`` images of ``dataset`` with their generated caption and a reference one."""
    from ..captioner import build_caption_model, caption_files, load_config
    from ..data.caption_mapper import build_caption_augmentations

    records = DatasetCatalog.get(dataset)[:count]
    cfg = load_config(config, opts)
    model = build_caption_model(cfg, weights)
    with torch.no_grad():
        results = caption_files(model, [r["file_name"] for r in records],
                                build_caption_augmentations(cfg, is_train=False),
                                batch_size=count, num_workers=0, progress=False)
    generated = {c["file_name"]: c["caption"] for c in results.captions}
    return [{"file_name": r["file_name"], "caption": generated.get(r["file_name"], ""),
             "reference": r["captions"][0]} for r in records]


def grounding_of(config: str, opts: Sequence[str], weights: str, count: int = 48,
                 dataset: str = "synthetic_captions_val") -> dict:
    """``tools/check_grounding.py``'s numbers for the pretrained captioner (see
    :mod:`virtex_d2.evaluation.grounding`)."""
    from ..captioner import build_caption_model, load_config
    from ..evaluation.grounding import grounding_batches, measure_grounding

    cfg = load_config(config, opts)
    model = build_caption_model(cfg, weights)
    return measure_grounding(model, grounding_batches(cfg, dataset, count)).to_json()
