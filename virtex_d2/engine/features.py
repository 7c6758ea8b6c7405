"""Frozen-backbone feature extraction for the VOC07 SVMs, with an on-disk cache.

Features are the globally average-pooled ``MODEL.CLASSIFIER.IN_FEATURE`` map (res5: 2048-d for an
R-50) of an :class:`ImageClassifier` in eval mode, stored *before* L2 normalisation. A cache file
is keyed by

- the checkpoint: absolute path, size, modification time and how it is read (``source``), or
  the seed for a random initialisation;
- the extractor: ``MODEL.BACKBONE``, ``MODEL.RESNETS``, pixel mean/std, the pooled feature,
  ``INPUT.FORMAT`` and the resize settings;
- the dataset: its name and the list of (image_id, file_name) it contains,

so re-running the SVM grid never re-extracts, and any change of those re-extracts.

Weights are loaded strictly into ``model.backbone`` through :mod:`virtex_d2.checkpoint.convert`
(the one conversion module): ``source`` "d2" is a converted backbone checkpoint (names without
prefix, what ``tools/convert_to_d2.py`` writes and ``MODEL.WEIGHTS`` holds), "virtex_d2" a raw
checkpoint of any model of this project with the ResNet under ``backbone.`` (a VirTex pretraining
run, a fine-tuned ImageClassifier), "virtex" a reference-code checkpoint, "torchvision" a
torchvision ResNet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from ..checkpoint.convert import convert_checkpoint
from ..data.classification_mapper import (
    ClassificationDatasetMapper,
    build_eval_augmentations,
    build_inference_loader,
)
from ..io import atomic_write
from ..modeling.classifier import ImageClassifier

logger = logging.getLogger(__name__)

__all__ = [
    "WEIGHT_SOURCES",
    "FeatureCache",
    "checkpoint_fingerprint",
    "extractor_fingerprint",
    "dataset_fingerprint",
    "load_backbone_weights",
    "extract_features",
    "get_features",
]

# "auto": recognised from the checkpoint's keys (convert.detect_source); "d2": a converted
# backbone (names without a prefix); the others as in tools/convert_to_d2.py.
WEIGHT_SOURCES = ("auto", "d2", "virtex_d2", "virtex", "torchvision")
_CACHE_VERSION = 1


# ------------------------------------------------------------------------------------ weights
def load_backbone_weights(model: ImageClassifier, weights: str, source: str = "auto") -> None:
    """Load a pretrained ResNet into ``model.backbone``; every backbone tensor must be found.

    Raises:
        ValueError: the checkpoint does not fit the backbone (message gives the config values
            the checkpoint needs), or ``source`` is unknown.
    """
    if source not in WEIGHT_SOURCES:
        raise ValueError(f"unknown weights source {source!r}; expected one of {WEIGHT_SOURCES}")
    if source == "d2":
        result = convert_checkpoint(weights, "virtex_d2", prefix="")
    else:
        result = convert_checkpoint(weights, source)
    hint = " ".join(f"{k} {v}" for k, v in result.config_overrides().items())
    expected = {k for k in model.backbone.state_dict() if not k.endswith("num_batches_tracked")}
    missing = sorted(expected - set(result.d2_state))
    unexpected = sorted(set(result.d2_state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"{weights} ({source}) holds a ResNet-{result.depth} that does not fit the "
            f"configured backbone: missing {missing[:4]}, unexpected {unexpected[:4]}. "
            f"The checkpoint needs: {hint}"
        )
    try:
        # BN counters are absent on purpose (see convert.py); torch fills them in.
        model.backbone.load_state_dict(result.d2_state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{weights} ({source}) does not fit the backbone ({hint}): {e}") from e
    logger.info(f"Loaded {len(result.d2_state)} backbone tensors from {weights} ({source})")


# -------------------------------------------------------------------------------- fingerprints
def checkpoint_fingerprint(weights: str, source: str, seed: int) -> dict[str, Any]:
    """Identity of the weights: file path, size and mtime, or the seed of a random init."""
    if not weights:
        return {"init": "random", "seed": int(seed)}
    st = os.stat(weights)
    return {
        "path": os.path.abspath(weights),
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "source": source,
    }


def extractor_fingerprint(cfg) -> dict[str, Any]:
    """Every config value that changes the pooled features for given weights and images."""
    s = cfg.TEST.VOC07_SVM
    return {
        "backbone": cfg.MODEL.BACKBONE.dump(),
        "resnets": cfg.MODEL.RESNETS.dump(),
        "pixel_mean": list(cfg.MODEL.PIXEL_MEAN),
        "pixel_std": list(cfg.MODEL.PIXEL_STD),
        "in_feature": cfg.MODEL.CLASSIFIER.IN_FEATURE,
        "format": cfg.INPUT.FORMAT,
        "resize_mode": s.RESIZE_MODE,
        "resize": s.RESIZE,
        "crop": s.CROP_SIZE if s.RESIZE_MODE == "shorter" else None,
    }


def dataset_fingerprint(dataset_name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    h = hashlib.sha1()
    for r in records:
        h.update(f"{r['image_id']}\t{r['file_name']}\n".encode())
    return {"name": dataset_name, "num_images": len(records), "images_sha1": h.hexdigest()}


# ------------------------------------------------------------------------------------- cache
class FeatureCache:
    """``<cache_dir>/<dataset>-<key>.npz`` files with ``features`` (N, C) float32, ``image_ids``
    and the json ``meta`` the key was computed from."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir

    @staticmethod
    def key(meta: dict[str, Any]) -> str:
        blob = json.dumps({"version": _CACHE_VERSION, **meta}, sort_keys=True, default=str)
        return hashlib.sha1(blob.encode()).hexdigest()[:20]

    def path(self, dataset_name: str, meta: dict[str, Any]) -> str:
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in dataset_name)
        return os.path.join(self.cache_dir, f"{safe}-{self.key(meta)}.npz")

    def load(self, dataset_name: str, meta: dict[str, Any]) -> np.ndarray | None:
        path = self.path(dataset_name, meta)
        if not os.path.isfile(path):
            return None
        with np.load(path, allow_pickle=False) as f:
            stored = json.loads(str(f["meta"]))
            if stored != json.loads(json.dumps(meta, default=str)):
                # A hash collision or a hand-edited file: never use features of other inputs.
                raise RuntimeError(f"{path}: cached metadata differs from its key; delete it")
            return f["features"]

    def save(
        self, dataset_name: str, meta: dict[str, Any], features: np.ndarray, image_ids: list[Any]
    ) -> str:
        path = self.path(dataset_name, meta)
        atomic_write(
            path,
            lambda f: np.savez(  # readers never see half a file
                f,
                features=features.astype(np.float32),
                image_ids=np.array([str(i) for i in image_ids]),
                meta=np.array(json.dumps(meta, default=str)),
            ),
        )
        return path


# -------------------------------------------------------------------------------- extraction
@torch.no_grad()
def extract_features(
    model: ImageClassifier, loader, num_images: int, desc: str = "features"
) -> np.ndarray:
    """Pooled features of every image the loader yields, in order: (N, C) float32."""
    model.eval()
    chunks = []
    with tqdm(total=num_images, desc=desc, unit="img") as bar:
        for batch in loader:
            chunks.append(model.pooled_features(batch).float().cpu().numpy())
            bar.update(len(batch))
    features = np.concatenate(chunks) if chunks else np.zeros((0, model.feature_dim), np.float32)
    if len(features) != num_images:
        raise RuntimeError(f"extracted {len(features)} features for {num_images} images")
    return features


def get_features(
    cfg,
    dataset_name: str,
    records: list[dict[str, Any]],
    model_factory: Callable[[], ImageClassifier],
    weights_meta: dict[str, Any],
    cache_dir: str | None,
    num_workers: int = 0,
) -> tuple[np.ndarray, bool]:
    """Features (N, C) of ``records`` from the cache, else extracted (and cached).

    Args:
        model_factory: builds the model with its weights loaded; only called on a cache miss.
        weights_meta: :func:`checkpoint_fingerprint` of the weights.
        cache_dir: None disables the cache.

    Returns:
        (features, whether they came from the cache).
    """
    meta = {
        "weights": weights_meta,
        "extractor": extractor_fingerprint(cfg),
        "dataset": dataset_fingerprint(dataset_name, records),
    }
    cache = FeatureCache(cache_dir) if cache_dir else None
    if cache is not None:
        cached = cache.load(dataset_name, meta)
        if cached is not None:
            logger.info(f"Features of '{dataset_name}' from {cache.path(dataset_name, meta)}")
            return cached, True
    s = cfg.TEST.VOC07_SVM
    mapper = ClassificationDatasetMapper(
        False,
        augmentations=build_eval_augmentations(s.RESIZE_MODE, s.RESIZE, s.CROP_SIZE),
        image_format=cfg.INPUT.FORMAT,
        require_label=False,
    )
    loader = build_inference_loader(records, mapper, s.IMS_PER_BATCH, num_workers)
    features = extract_features(model_factory(), loader, len(records), desc=dataset_name)
    if cache is not None:
        path = cache.save(dataset_name, meta, features, [r["image_id"] for r in records])
        logger.info(f"Cached features of '{dataset_name}' in {path}")
    return features, False
