"""PASCAL VOC 2007 linear SVM protocol on frozen features (VirTex reference / Goyal et al. 2019).

Per class, one-vs-rest ``sklearn.svm.LinearSVC`` (L2 penalty, squared hinge loss by default,
``class_weight={+1: 2, -1: 1}``, at most 2000 iterations) on L2-normalised features. The cost C
is the one of ``COSTS`` (0.01, 0.1, 1, 10) with the best mean average precision over a 3-fold
stratified cross-validation on trainval (lowest cost on ties); the SVM refitted on all of
trainval with it is scored on test with ``average_precision_score``.

Targets follow VOC's convention: +1 present, 0 difficult only, -1 absent. As in the reference
code, training treats "difficult only" as negative, and test AP ignores those images for that
class. mAP is the mean over classes; "chance" is the AP of a random ranking, i.e. the fraction
of positives among the evaluated test images.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import average_precision_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.svm import LinearSVC

logger = logging.getLogger(__name__)

__all__ = [
    "SVMSettings",
    "svm_settings_from_cfg",
    "l2_normalize",
    "train_class_svm",
    "run_svm_protocol",
]


@dataclass(frozen=True)
class SVMSettings:
    """See ``TEST.VOC07_SVM`` in :mod:`virtex_d2.config`."""

    costs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
    cv_folds: int = 3
    positive_weight: float = 2.0
    loss: str = "squared_hinge"
    max_iter: int = 2000
    l2_normalize: bool = True


def svm_settings_from_cfg(cfg) -> SVMSettings:
    s = cfg.TEST.VOC07_SVM
    return SVMSettings(
        costs=tuple(float(c) for c in s.COSTS),
        cv_folds=int(s.CV_FOLDS),
        positive_weight=float(s.POSITIVE_WEIGHT),
        loss=s.LOSS,
        max_iter=int(s.MAX_ITER),
        l2_normalize=bool(s.L2_NORMALIZE),
    )


def l2_normalize(features: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm: (N, C) -> (N, C)."""
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{int((norms == 0).sum())} feature vector(s) are all zero")
    return features / norms


def _make_svm(settings: SVMSettings, cost: float) -> LinearSVC:
    return LinearSVC(
        C=cost,
        class_weight={1: settings.positive_weight, -1: 1.0},
        penalty="l2",
        loss=settings.loss,
        # The dual solver was LinearSVC's default when the protocol was defined.
        dual=True,
        max_iter=settings.max_iter,
        random_state=0,
    )


def train_class_svm(
    features: np.ndarray, targets: np.ndarray, settings: SVMSettings, class_name: str = "?"
) -> dict[str, Any]:
    """Choose the cost by cross-validation and refit on everything.

    Args:
        features: (N, C) training features (already normalised if wanted).
        targets: (N,) in {+1, 0, -1}; 0 (difficult only) is used as negative.

    Returns:
        ``{"svm": fitted LinearSVC, "cost": float, "cv_ap": {cost: mean AP},
        "convergence_warnings": int}``.
    """
    labels = np.where(targets == 1, 1, -1)
    num_pos = int((labels == 1).sum())
    if num_pos < settings.cv_folds or len(labels) - num_pos < settings.cv_folds:
        raise ValueError(
            f"class '{class_name}': {num_pos} positive and {len(labels) - num_pos} negative "
            f"training images; {settings.cv_folds}-fold cross-validation needs at least "
            f"{settings.cv_folds} of each"
        )
    folds = StratifiedKFold(n_splits=settings.cv_folds)  # unshuffled, as cross_val_score(cv=3)
    cv_ap: dict[float, float] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        for cost in settings.costs:
            scores = cross_val_score(
                _make_svm(settings, cost), features, labels, cv=folds,
                scoring="average_precision", error_score="raise",
            )  # fmt: skip
            cv_ap[cost] = float(np.mean(scores))
        # First maximum = lowest cost on ties, like the reference's strict ">" scan.
        best = max(settings.costs, key=lambda c: (cv_ap[c], -settings.costs.index(c)))
        svm = _make_svm(settings, best).fit(features, labels)
    n_warn = sum(issubclass(w.category, ConvergenceWarning) for w in caught)
    return {"svm": svm, "cost": best, "cv_ap": cv_ap, "convergence_warnings": n_warn}


def _one_class(
    k: int,
    name: str,
    train_x: np.ndarray,
    train_t: np.ndarray,
    test_x: np.ndarray,
    test_t: np.ndarray,
    settings: SVMSettings,
) -> dict[str, Any]:
    fit = train_class_svm(train_x, train_t, settings, name)
    keep = test_t != 0  # difficult-only images do not count for this class
    positives = test_t[keep] == 1
    if not positives.any():
        raise ValueError(f"class '{name}' has no (non-difficult) positive test image")
    scores = fit["svm"].decision_function(test_x[keep])
    return {
        "class": name,
        "ap": 100.0 * float(average_precision_score(positives, scores)),
        "chance": 100.0 * float(positives.mean()),
        "cost": fit["cost"],
        "cv_ap": {str(c): 100.0 * v for c, v in fit["cv_ap"].items()},
        "num_test": int(keep.sum()),
        "num_train_pos": int((train_t == 1).sum()),
        "convergence_warnings": fit["convergence_warnings"],
    }


def run_svm_protocol(
    train_features: np.ndarray,
    train_targets: np.ndarray,
    test_features: np.ndarray,
    test_targets: np.ndarray,
    class_names: Sequence[str],
    settings: SVMSettings = SVMSettings(),
    n_jobs: int = 1,
) -> dict[str, Any]:
    """Train and test one SVM per class.

    Args:
        train_features / test_features: (N, C) / (M, C) pooled features (not yet normalised).
        train_targets / test_targets: (N, K) / (M, K) in {+1, 0, -1}.
        n_jobs: classes trained in parallel (joblib processes).

    Returns:
        ``{"mAP", "chance_mAP", "per_class": [per-class dicts], "settings"}``; APs in percent.
    """
    K = len(class_names)
    if train_targets.shape != (len(train_features), K) or test_targets.shape != (
        len(test_features),
        K,
    ):
        raise ValueError(
            f"targets {train_targets.shape} / {test_targets.shape} do not match features "
            f"{train_features.shape} / {test_features.shape} and {K} classes"
        )
    if settings.l2_normalize:
        train_features, test_features = l2_normalize(train_features), l2_normalize(test_features)
    args = [
        (k, class_names[k], train_features, train_targets[:, k], test_features,
         test_targets[:, k], settings)
        for k in range(K)
    ]  # fmt: skip
    if n_jobs == 1:
        per_class: list[dict[str, Any]] = [_one_class(*a) for a in args]
    else:
        from joblib import Parallel, delayed

        per_class = Parallel(n_jobs=n_jobs)(delayed(_one_class)(*a) for a in args)
    for r in per_class:
        logger.info(
            f"{r['class']:>14s}: AP {r['ap']:6.2f} (chance {r['chance']:5.2f}), cost {r['cost']}"
            + (f", {r['convergence_warnings']} convergence warning(s)"
               if r["convergence_warnings"] else "")
        )  # fmt: skip
    return {
        "mAP": float(np.mean([r["ap"] for r in per_class])),
        "chance_mAP": float(np.mean([r["chance"] for r in per_class])),
        "per_class": per_class,
        "settings": asdict(settings),
    }
