#!/usr/bin/env python
"""PASCAL VOC 2007 linear SVM evaluation of a frozen backbone (VirTex / Goyal et al. protocol).

    python tools/eval_voc07_svm.py --config-file configs/classification/voc07_svm_R_50_virtex.yaml
    python tools/eval_voc07_svm.py --config-file F --weights output/virtex_R_50_d2.pth \
        --json output/voc07_svm.json
    python tools/eval_voc07_svm.py --config-file F \
        --weights output/pretrain/bicaptioning_R_50_L1_H2048/model_final.pth
    # synthetic shapes, CPU, multi-label targets from the shapes present:
    python tools/eval_voc07_svm.py --config-file configs/synthetic/linear_probe_R_18.yaml \
        --dataset synthetic_cls_train,synthetic_cls_val MODEL.DEVICE cpu TEST.VOC07_SVM.RESIZE 128

Weights (``--weights``, default ``MODEL.WEIGHTS``; empty = random init seeded by ``SEED``, or 0)
are loaded strictly into the backbone. Their layout is recognised from the keys (``--weights-source
auto``, the default): a converted backbone from tools/convert_to_d2.py, a raw checkpoint of this
project's models (ResNet under ``backbone.``, e.g. a VirTex pretraining run), a reference-code
checkpoint or a torchvision ResNet; ``--weights-source d2|virtex_d2|virtex|torchvision`` insists
on one. Pooled features are cached (see
virtex_d2/engine/features.py), so re-running with other ``--costs`` does not re-extract.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

import numpy as np
import torch
from detectron2.utils.logger import setup_logger

from virtex_d2.config import setup_cfg
from virtex_d2.data.datasets.classification import load_multilabel_targets
from virtex_d2.engine.features import (
    WEIGHT_SOURCES,
    checkpoint_fingerprint,
    get_features,
    load_backbone_weights,
)
from virtex_d2.evaluation.voc07_svm import run_svm_protocol, svm_settings_from_cfg
from virtex_d2.modeling.classifier import ImageClassifier

logger = logging.getLogger("virtex_d2.voc07_svm")


def _to_json(obj: Any) -> Any:
    return obj.item() if isinstance(obj, np.generic) else str(obj)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True, metavar="FILE")
    p.add_argument("--weights", default=None, help="checkpoint (default: MODEL.WEIGHTS)")
    p.add_argument(
        "--weights-source",
        default="auto",
        choices=WEIGHT_SOURCES,
        help="checkpoint layout (default: recognised from its keys)",
    )
    p.add_argument("--dataset", default=None, help="TRAIN,TEST registered dataset names")
    p.add_argument("--costs", type=float, nargs="+", default=None, help="SVM costs C")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results here")
    p.add_argument("--cache-dir", default=None, help="feature cache (default: config)")
    p.add_argument("--no-cache", action="store_true", help="always extract, never cache")
    p.add_argument(
        "--jobs",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="classes whose SVMs are trained in parallel processes (default: min(8, CPUs))",
    )
    p.add_argument("--num-workers", type=int, default=None, help="data-loading processes")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return p.parse_args(argv)


def setup(args: argparse.Namespace):
    cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    if args.dataset is not None:
        names = tuple(n.strip() for n in args.dataset.split(","))
        if len(names) != 2 or not all(names):
            raise SystemExit(f"--dataset needs TRAIN,TEST, got {args.dataset!r}")
        cfg.TEST.VOC07_SVM.DATASETS = names
    if args.costs is not None:
        cfg.TEST.VOC07_SVM.COSTS = tuple(args.costs)
    if args.weights is not None:
        cfg.MODEL.WEIGHTS = args.weights
    cfg.freeze()
    return cfg


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    cfg = setup(args)
    setup_logger(name="virtex_d2")
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; add MODEL.DEVICE cpu to the command line")
    weights, source = cfg.MODEL.WEIGHTS, args.weights_source
    seed = cfg.SEED if cfg.SEED >= 0 else 0
    if not weights:
        logger.warning(f"No weights: features of a RANDOMLY initialised backbone (seed {seed})")
    cache_dir = None
    if not args.no_cache:
        cache_dir = (
            args.cache_dir
            or cfg.TEST.VOC07_SVM.CACHE_DIR
            or os.path.join(cfg.OUTPUT_DIR, "feature_cache")
        )
    num_workers = cfg.DATALOADER.NUM_WORKERS if args.num_workers is None else args.num_workers

    built: list[ImageClassifier] = []

    def model_factory() -> ImageClassifier:
        # Built at most once, and only if some split is not cached.
        if not built:
            torch.manual_seed(seed)
            model = ImageClassifier(cfg)
            if weights:
                load_backbone_weights(model, weights, source)
            built.append(model.to(torch.device(cfg.MODEL.DEVICE)).eval())
        return built[0]

    weights_meta = checkpoint_fingerprint(weights, source, seed)
    splits = []
    for name in cfg.TEST.VOC07_SVM.DATASETS:
        records, targets, classes = load_multilabel_targets(name)
        feats, hit = get_features(
            cfg, name, records, model_factory, weights_meta, cache_dir, num_workers
        )
        splits.append({"name": name, "features": feats, "targets": targets,
                       "classes": classes, "cache_hit": hit})  # fmt: skip
    train, test = splits
    if train["classes"] != test["classes"]:
        raise SystemExit(f"{train['name']} and {test['name']} have different classes")

    results = run_svm_protocol(
        train["features"], train["targets"], test["features"], test["targets"],
        train["classes"], svm_settings_from_cfg(cfg), n_jobs=args.jobs,
    )  # fmt: skip
    results.update(
        weights=weights or None,
        weights_source=source if weights else "random",
        seed=seed if not weights else None,
        datasets=list(cfg.TEST.VOC07_SVM.DATASETS),
        num_train=int(len(train["features"])),
        num_test=int(len(test["features"])),
        feature_dim=int(train["features"].shape[1]),
        features_from_cache={s["name"]: s["cache_hit"] for s in splits},
    )
    logger.info(
        f"VOC07 SVM mAP {results['mAP']:.2f} (chance {results['chance_mAP']:.2f}) on "
        f"{test['name']}, {results['num_train']} train / {results['num_test']} test images, "
        f"{results['feature_dim']}-d features"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=_to_json)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
