"""FastCOCOEvaluator / FastLVISEvaluator and evaluate_coco_json.

COCO numbers are checked against pycocotools on real COCO annotations (coco_tiny) with noisy
detections; LVIS numbers against a case computed by hand and against the official ``lvis``
package's evaluator.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import random
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_lvis_instances
from detectron2.structures import Boxes, BoxMode, Instances
from helpers import SHARED, load_tool

from virtex_d2.evaluation import FastCOCOEvaluator, FastLVISEvaluator
from virtex_d2.evaluation.fast_cocoeval import (
    COCO_METRICS,
    LVIS_METRICS,
    evaluate_coco_json,
    limit_dets_per_image,
)

# pycocotools' and Detectron2's mask code trip numpy 2's __array__(copy=...) deprecation on
# every mask; thousands of identical warnings would bury real ones.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

COCO_TINY_VAL = SHARED / "data" / "coco_tiny" / "annotations" / "instances_val2017.json"
TOL = 1e-4  # percent


def _close(a: float, b: float, tol: float = TOL) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= tol


def _assert_metrics_equal(ours: dict, ref: dict, keys) -> None:
    bad = {k: (ours[k], ref[k]) for k in keys if not _close(ours[k], ref[k])}
    assert not bad, f"metrics differ (ours, reference): {bad}"


# --- COCO: parity with pycocotools on real annotations ----------------------------------------


@pytest.fixture(scope="module")
def coco_gt() -> dict:
    if not COCO_TINY_VAL.exists():
        pytest.skip(f"coco_tiny not found at {COCO_TINY_VAL}")
    return json.loads(COCO_TINY_VAL.read_text())


def _gt_rle(ann: dict, h: int, w: int) -> dict:
    seg = ann["segmentation"]
    if isinstance(seg, list):
        return mask_util.merge(mask_util.frPyObjects(seg, h, w))
    if isinstance(seg["counts"], list):
        return mask_util.frPyObjects(seg, h, w)
    return seg


def noisy_coco_detections(gt: dict, seed: int = 0) -> list:
    """Results derived from ground truth: shifted masks, jittered boxes, random scores, some
    wrong labels, missed objects and false positives; crowd regions get detections too."""
    rng = random.Random(seed)
    images = {im["id"]: im for im in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    results = []
    for ann in gt["annotations"]:
        if rng.random() < 0.15:
            continue
        im = images[ann["image_id"]]
        h, w = im["height"], im["width"]
        mask = mask_util.decode(_gt_rle(ann, h, w))
        x, y, bw, bh = ann["bbox"]
        dx, dy = int(round(rng.gauss(0, 0.1) * bw)), int(round(rng.gauss(0, 0.1) * bh))
        mask = np.roll(mask, (dy, dx), axis=(0, 1))
        rle = mask_util.encode(np.asfortranarray(mask))
        rle["counts"] = rle["counts"].decode("ascii")
        box = [
            x + rng.gauss(0, 0.08) * bw,
            y + rng.gauss(0, 0.08) * bh,
            bw * rng.uniform(0.85, 1.15),
            bh * rng.uniform(0.85, 1.15),
        ]
        label = ann["category_id"] if rng.random() < 0.9 else rng.choice(cat_ids)
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": label,
                "bbox": box,
                "score": rng.random(),
                "segmentation": rle,
            }
        )
    for im in gt["images"]:
        h, w = im["height"], im["width"]
        for _ in range(2):
            x0, y0 = rng.randrange(0, w - 40), rng.randrange(0, h - 40)
            bw, bh = rng.randint(10, min(200, w - x0)), rng.randint(10, min(200, h - y0))
            mask = np.zeros((h, w), dtype=np.uint8)
            mask[y0 : y0 + bh, x0 : x0 + bw] = 1
            rle = mask_util.encode(np.asfortranarray(mask))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append(
                {
                    "image_id": im["id"],
                    "category_id": rng.choice(cat_ids),
                    "bbox": [x0, y0, bw, bh],
                    "score": rng.random() * 0.5,
                    "segmentation": rle,
                }
            )
    return results


def pycocotools_metrics(gt: dict, results: list, iou_type: str) -> tuple:
    """pycocotools COCOeval set up as Detectron2's COCOEvaluator: (summary dict, precision)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(results), iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    summary = {
        n: ev.stats[i] * 100 if ev.stats[i] >= 0 else float("nan")
        for i, n in enumerate(COCO_METRICS)
    }
    return summary, ev.eval["precision"], ev.params.catIds


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_matches_pycocotools(coco_gt, iou_type):
    results = noisy_coco_detections(coco_gt)
    assert any(a["iscrowd"] for a in coco_gt["annotations"]), "want crowd regions in the test"
    snapshot = copy.deepcopy(results)
    ours = evaluate_coco_json(coco_gt, results, iou_type, per_category=True)
    assert results == snapshot, "evaluate_coco_json must not modify its inputs"
    ref, precision, cat_ids = pycocotools_metrics(coco_gt, results, iou_type)

    assert 10 < ref["AP"] < 90, "detections should give a non-degenerate AP"
    _assert_metrics_equal(ours, ref, COCO_METRICS)
    names = {c["id"]: c["name"] for c in coco_gt["categories"]}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        expected = p[p > -1].mean() * 100 if (p > -1).any() else float("nan")
        assert _close(ours["AP-" + names[cat_id]], expected), names[cat_id]


def test_coco_max_dets_and_empty_results(coco_gt):
    results = noisy_coco_detections(coco_gt, seed=1)
    few = evaluate_coco_json(coco_gt, results, "bbox", max_dets=2)
    many = evaluate_coco_json(coco_gt, results, "bbox")
    assert few["AP"] < many["AP"]
    empty = evaluate_coco_json(coco_gt, [], "segm")
    assert all(empty[k] == 0.0 for k in COCO_METRICS)


# --- LVIS: a case computed by hand ------------------------------------------------------------


def _rect(box):
    x, y, w, h = box
    return [[x, y, x, y + h, x + w, y + h, x + w, y]]


def hand_lvis_gt() -> dict:
    """3 images, categories 1 (rare), 2 (common), 3 (frequent).

    img 1: GT cat 3 [10,10,40,40], cat 2 [100,100,40,40], cat 1 [5,150,30,30] (small);
           cat 2 is not exhaustively annotated.
    img 2: GT cat 3 [10,10,40,40]; cat 1 is a verified negative.
    img 3: GT cat 1 [100,100,50,50].
    """
    cats = [
        {"id": 1, "name": "rare_thing", "frequency": "r"},
        {"id": 2, "name": "common_thing", "frequency": "c"},
        {"id": 3, "name": "frequent_thing", "frequency": "f"},
    ]
    images = [
        {"id": 1, "neg_category_ids": [], "not_exhaustive_category_ids": [2]},
        {"id": 2, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        {"id": 3, "neg_category_ids": [], "not_exhaustive_category_ids": []},
    ]
    for im in images:
        im.update(
            height=200,
            width=200,
            file_name=f"{im['id']}.jpg",
            coco_url=f"http://x/val2017/{im['id']}.jpg",
        )
    boxes = [
        (1, 3, [10, 10, 40, 40]),
        (2, 3, [10, 10, 40, 40]),
        (1, 2, [100, 100, 40, 40]),
        (3, 1, [100, 100, 50, 50]),
        (1, 1, [5, 150, 30, 30]),
    ]
    anns = [
        {
            "id": i + 1,
            "image_id": im,
            "category_id": c,
            "bbox": b,
            "area": b[2] * b[3],
            "segmentation": _rect(b),
        }
        for i, (im, c, b) in enumerate(boxes)
    ]
    return {"images": images, "annotations": anns, "categories": cats}


# (image, category, box, score); the comment says how the LVIS protocol treats each one.
HAND_DETECTIONS = [
    (1, 3, [10, 10, 40, 40], 0.90),  # TP
    (2, 3, [120, 120, 20, 20], 0.80),  # FP (small)
    (2, 3, [10, 10, 40, 40], 0.70),  # TP
    (1, 2, [100, 100, 40, 40], 0.60),  # TP
    (1, 2, [150, 10, 30, 30], 0.95),  # unmatched, not exhaustive on img 1: ignored
    (2, 2, [60, 60, 30, 30], 0.99),  # cat 2 neither positive nor negative on img 2: ignored
    (2, 1, [60, 10, 20, 20], 0.55),  # FP (negative category on img 2, small)
    (3, 1, [100, 100, 50, 50], 0.50),  # TP, but 301st of img 3's detections: dropped
    (1, 1, [5, 150, 30, 30], 0.30),  # TP (small)
] + [(3, 2, [0, 0, 10, 10], 0.6 + 0.001 * i) for i in range(300)]  # ignored, but fill the cap

# By hand, with 101-point interpolated precision (IoUs are 1 or 0, so every IoU threshold
# gives the same AP):
#   cat 3: TP .9, FP .8, TP .7, 2 GT -> precision 1 up to recall .5 (51 points), then 2/3 (50)
#          AP = (51 + 50 * 2/3) / 101 = 253/303
#   cat 2: TP .6 only (the .95 and .99 detections are ignored), 1 GT -> AP = 1
#   cat 1: FP .55, TP .3 (.5 was capped away), 2 GT -> precision .5 up to recall .5, 0 after
#          AP = 51 * .5 / 101 = 51/202   (without the cap: FP, TP, TP -> 2/3)
#   small: only cat 1 has a small GT; FP .55 (small), TP .3 -> AP = .5 (others -1, skipped)
#   medium: cat 3 -> 1 (small FP ignored); cat 2 -> 1; cat 1 -> its medium GT is undetected
#           and its small GT's match is ignored -> 0; mean 2/3
#   large: no GT -> NaN
AP_R, AP_C, AP_F = 51 / 202, 1.0, 253 / 303
HAND_EXPECTED = {
    "AP": (AP_R + AP_C + AP_F) / 3 * 100,
    "AP50": (AP_R + AP_C + AP_F) / 3 * 100,
    "AP75": (AP_R + AP_C + AP_F) / 3 * 100,
    "APs": 50.0,
    "APm": 200 / 3,
    "APl": float("nan"),
    "APr": AP_R * 100,
    "APc": AP_C * 100,
    "APf": AP_F * 100,
}


def hand_lvis_results(with_masks: bool) -> list:
    out = []
    for im, cat, box, score in HAND_DETECTIONS:
        r = {"image_id": im, "category_id": cat, "bbox": box, "score": score}
        if with_masks:
            rle = mask_util.merge(mask_util.frPyObjects(_rect(box), 200, 200))
            r["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        out.append(r)
    return out


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_hand_computed(iou_type):
    gt = hand_lvis_gt()
    results = hand_lvis_results(with_masks=iou_type == "segm")
    ours = evaluate_coco_json(gt, results, iou_type, lvis=True)
    assert set(ours) == set(LVIS_METRICS)
    _assert_metrics_equal(ours, HAND_EXPECTED, LVIS_METRICS)

    # The per-image cap is what moves APr from 2/3 to 51/202 (and APm from 1 to 2/3).
    uncapped = evaluate_coco_json(gt, results, iou_type, lvis=True, max_dets=1000)
    assert _close(uncapped["APr"], 200 / 3) and _close(uncapped["APm"], 100.0)


def test_limit_dets_per_image_is_across_categories():
    results = [
        {"image_id": 1, "category_id": c, "score": s}
        for c, s in [(1, 0.1), (2, 0.9), (3, 0.5), (1, 0.7)]
    ]
    results.append({"image_id": 2, "category_id": 1, "score": 0.01})
    kept = limit_dets_per_image(results, 2)
    assert [(r["image_id"], r["score"]) for r in kept] == [(1, 0.9), (1, 0.7), (2, 0.01)]


def test_hotcoco_lvis_cap_equals_limit_dets_per_image():
    """The per-image cap inside evaluation (hotcoco.LVISResults) keeps what the official rule
    keeps, ties included: equal scores across categories straddling the cap."""
    import hotcoco

    gt = hand_lvis_gt()
    rng = random.Random(3)
    results = [
        {
            "image_id": rng.choice([1, 2, 3]),
            "category_id": rng.choice([1, 2, 3]),
            "bbox": [rng.uniform(0, 100), rng.uniform(0, 100), 20, 20],
            "score": rng.choice([0.1, 0.5, 0.5, 0.9]),
        }
        for _ in range(60)
    ]
    for i, r in enumerate(results):
        r["bbox"][2] = 1 + i  # a key to tell detections apart after hotcoco copied them
    expected = sorted(r["bbox"][2] for r in limit_dets_per_image(results, 7))
    capped = hotcoco.LVISResults(hotcoco.COCO(gt), copy.deepcopy(results), max_dets=7)
    got = sorted(a["bbox"][2] for a in capped.anns.values())
    assert len(expected) == 21 and got == expected


# --- LVIS: parity with the official lvis package ----------------------------------------------


def random_lvis_case(coco: dict, seed: int = 0) -> tuple:
    """coco_tiny turned into a federated LVIS-style set, with LVIS-style noisy detections."""
    rng = random.Random(seed)
    gt = copy.deepcopy(coco)
    gt["annotations"] = [a for a in gt["annotations"] if not a["iscrowd"]]  # LVIS has none
    for a in gt["annotations"]:
        del a["iscrowd"]
    cat_ids = [c["id"] for c in gt["categories"]]
    for c in gt["categories"]:
        c["frequency"] = rng.choice("rcf")
    present = {}
    for a in gt["annotations"]:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for im in gt["images"]:
        pos = sorted(present.get(im["id"], ()))
        absent = [c for c in cat_ids if c not in pos]
        im["neg_category_ids"] = rng.sample(absent, 5)
        im["not_exhaustive_category_ids"] = [c for c in pos if rng.random() < 0.3]
    results = noisy_coco_detections(gt, seed=seed)
    for r in results:  # labels from everywhere: positive, negative and unannotated categories
        if rng.random() < 0.3:
            r["category_id"] = rng.choice(cat_ids)
    crowded = gt["images"][0]
    for _ in range(320):  # one image above the 300 cap
        x, y = rng.uniform(0, crowded["width"] - 50), rng.uniform(0, crowded["height"] - 50)
        box = [x, y, rng.uniform(5, 50), rng.uniform(5, 50)]
        rle = mask_util.merge(
            mask_util.frPyObjects(_rect(box), crowded["height"], crowded["width"])
        )
        rle["counts"] = rle["counts"].decode("ascii")
        results.append(
            {
                "image_id": crowded["id"],
                "category_id": rng.choice(cat_ids),
                "bbox": box,
                "score": rng.random(),
                "segmentation": rle,
            }
        )
    return gt, results


def official_lvis_metrics(
    gt: dict, results: list, iou_type: str, tmp_path: Path, monkeypatch
) -> dict:
    """The reference: the official ``lvis`` 0.5.3 package (LVIS, LVISResults, LVISEval), unchanged.

    It fails on numpy >= 1.24 only because it uses the removed ``np.float`` / ``np.int``
    aliases; they are restored (as the builtins they used to be) for the duration of the test
    with pytest's ``monkeypatch``, which removes them again afterwards.
    """
    lvis = pytest.importorskip("lvis")
    monkeypatch.setattr(np, "float", float, raising=False)
    monkeypatch.setattr(np, "int", int, raising=False)
    path = tmp_path / "lvis_gt.json"
    path.write_text(json.dumps(gt))
    results = copy.deepcopy(results)
    if iou_type == "segm":
        for r in results:
            r.pop("bbox", None)  # as Detectron2's LVISEvaluator does
    lvis_gt = lvis.LVIS(str(path))
    ev = lvis.LVISEval(lvis_gt, lvis.LVISResults(lvis_gt, results), iou_type)
    ev.run()
    return {k: ev.results[k] * 100 if ev.results[k] >= 0 else float("nan") for k in LVIS_METRICS}


@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_lvis_matches_official_lvis_eval(coco_gt, iou_type, tmp_path, monkeypatch):
    """AP, AP50, AP75, APs/m/l and APr/c/f equal the official ``lvis`` 0.5.3 LVISEval's to
    1e-4 on coco_tiny made federated (negatives, not-exhaustive categories, one image over the
    300 cap). The reference is the unmodified package, run with numpy's removed ``np.float`` /
    ``np.int`` aliases restored for this test only (monkeypatch; see official_lvis_metrics)."""
    gt, results = random_lvis_case(coco_gt)
    ref = official_lvis_metrics(gt, results, iou_type, tmp_path, monkeypatch)
    ours = evaluate_coco_json(gt, results, iou_type, lvis=True)
    assert 5 < ref["AP"] < 95
    _assert_metrics_equal(ours, ref, LVIS_METRICS)


def test_hand_case_matches_official_lvis_eval(tmp_path, monkeypatch):
    ref = official_lvis_metrics(
        hand_lvis_gt(), hand_lvis_results(False), "bbox", tmp_path, monkeypatch
    )
    _assert_metrics_equal(ref, HAND_EXPECTED, LVIS_METRICS)


# --- the DatasetEvaluators --------------------------------------------------------------------


def _instances(dets: list, h: int, w: int, with_masks: bool) -> Instances:
    """dets: (contiguous class, XYWH box, score, mask or None)."""
    inst = Instances((h, w))
    boxes = [BoxMode.convert(list(b), BoxMode.XYWH_ABS, BoxMode.XYXY_ABS) for _, b, _, _ in dets]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.tensor([s for _, _, s, _ in dets], dtype=torch.float32)
    inst.pred_classes = torch.tensor([c for c, _, _, _ in dets], dtype=torch.int64)
    if with_masks:
        masks = [torch.from_numpy(m.astype(bool)) for _, _, _, m in dets]
        inst.pred_masks = torch.stack(masks) if masks else torch.zeros((0, h, w), dtype=bool)
    return inst


def coco_model_outputs(gt: dict, image_ids: list, seed: int = 0) -> list:
    """(inputs, outputs) pairs a Mask R-CNN could produce, derived from GT per image."""
    to_contiguous = {
        c["id"]: i for i, c in enumerate(sorted(gt["categories"], key=lambda c: c["id"]))
    }
    images = {im["id"]: im for im in gt["images"]}
    pairs = []
    for image_id in image_ids:
        rng = random.Random(seed * 100003 + image_id)
        im = images[image_id]
        h, w = im["height"], im["width"]
        dets = []
        for ann in (a for a in gt["annotations"] if a["image_id"] == image_id):
            if rng.random() < 0.15:
                continue
            mask = mask_util.decode(_gt_rle(ann, h, w))
            mask = np.roll(mask, (rng.randint(-4, 4), rng.randint(-4, 4)), axis=(0, 1))
            x, y, bw, bh = ann["bbox"]
            box = [x + rng.uniform(-3, 3), y + rng.uniform(-3, 3), bw, bh]
            label = to_contiguous[ann["category_id"]]
            if rng.random() < 0.1:
                label = rng.randrange(len(to_contiguous))
            dets.append((label, box, rng.uniform(0.05, 1.0), mask))
        pairs.append(
            (
                {"image_id": image_id, "height": h, "width": w},
                {"instances": _instances(dets, h, w, with_masks=True)},
            )
        )
    return pairs


def register_coco_tiny(name: str, gt: dict) -> None:
    if name in DatasetCatalog.list():
        return
    cats = sorted(gt["categories"], key=lambda c: c["id"])
    DatasetCatalog.register(name, lambda: [])
    MetadataCatalog.get(name).set(
        json_file=str(COCO_TINY_VAL),
        evaluator_type="coco",
        thing_classes=[c["name"] for c in cats],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(cats)},
    )


def _run_evaluator(evaluator, pairs) -> dict:
    evaluator.reset()
    for inp, out in pairs:
        evaluator.process([inp], [out])
    return evaluator.evaluate()


def test_coco_evaluator_end_to_end(coco_gt, tmp_path):
    register_coco_tiny("coco_tiny_val_fast_eval", coco_gt)
    image_ids = sorted(im["id"] for im in coco_gt["images"])[:20]
    pairs = coco_model_outputs(coco_gt, image_ids)
    evaluator = FastCOCOEvaluator(
        "coco_tiny_val_fast_eval", output_dir=str(tmp_path), distributed=True
    )  # one process: gather is a no-op
    res = _run_evaluator(evaluator, pairs)
    assert list(res) == ["bbox", "segm"]

    written = json.loads((tmp_path / "coco_instances_results.json").read_text())
    assert len(written) == sum(len(o["instances"]) for _, o in pairs)
    # Contiguous ids were mapped back: COCO's ids run to 90 with gaps.
    gt_ids = {c["id"] for c in coco_gt["categories"]}
    assert {r["category_id"] for r in written} <= gt_ids
    assert max(r["category_id"] for r in written) > 80
    for task in ("bbox", "segm"):
        ref, _, _ = pycocotools_metrics(coco_gt, written, task)
        assert 1 < ref["AP"] < 99
        _assert_metrics_equal(res[task], ref, COCO_METRICS)
        assert "AP-person" in res[task]

    # evaluate() can be called again, and a second round after reset() starts from scratch.
    _assert_metrics_equal(evaluator.evaluate()["bbox"], res["bbox"], COCO_METRICS)
    again = _run_evaluator(evaluator, pairs)
    _assert_metrics_equal(again["segm"], res["segm"], COCO_METRICS)


def test_coco_evaluator_without_json_file(tmp_path):
    """A dataset with no json_file is converted by Detectron2 (in memory or cached)."""
    name = "fast_eval_no_json_file"
    boxes = [[10, 10, 50, 40], [100, 80, 60, 60]]
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(
            name,
            lambda: [
                {
                    "file_name": "x.jpg",
                    "image_id": 7,
                    "height": 200,
                    "width": 200,
                    "annotations": [
                        {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": i, "iscrowd": 0}
                        for i, b in enumerate(boxes)
                    ],
                }
            ],
        )
        MetadataCatalog.get(name).set(thing_classes=["a", "b"])
    perfect = [(0, boxes[0], 0.9, None), (1, boxes[1], 0.8, None)]
    half = [(0, boxes[0], 0.9, None)]
    inp = {"image_id": 7, "height": 200, "width": 200}
    for output_dir in (None, str(tmp_path)):
        ev = FastCOCOEvaluator(name, output_dir=output_dir, distributed=False)
        res = _run_evaluator(ev, [(inp, {"instances": _instances(perfect, 200, 200, False)})])
        assert list(res) == ["bbox"] and _close(res["bbox"]["AP"], 100.0)
        res = _run_evaluator(ev, [(inp, {"instances": _instances(half, 200, 200, False)})])
        assert _close(res["bbox"]["AP"], 50.0) and _close(res["bbox"]["AP-b"], 0.0)
    assert (tmp_path / f"{name}_coco_format.json").exists()


def register_hand_lvis(name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(hand_lvis_gt()))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_lvis_instances(name, {}, str(path), str(tmp_path))
    return path


def test_lvis_evaluator_hand_case(tmp_path):
    register_hand_lvis("fast_eval_hand_lvis", tmp_path)
    pairs = []
    for image_id in (1, 2, 3):
        rows = hand_lvis_results(with_masks=True)
        dets = [
            (
                r["category_id"] - 1,
                r["bbox"],
                r["score"],  # LVIS ids are 1-based
                mask_util.decode(r["segmentation"]),
            )
            for r in rows
            if r["image_id"] == image_id
        ]
        pairs.append(
            (
                {"image_id": image_id, "height": 200, "width": 200},
                {"instances": _instances(dets, 200, 200, with_masks=True)},
            )
        )
    ev = FastLVISEvaluator("fast_eval_hand_lvis", output_dir=str(tmp_path / "out"))
    res = _run_evaluator(ev, pairs)
    assert list(res) == ["bbox", "segm"]
    for task in ("bbox", "segm"):
        # float32 boxes and scores of the model outputs leave the hand numbers unchanged.
        _assert_metrics_equal(res[task], HAND_EXPECTED, LVIS_METRICS)
    written = json.loads((tmp_path / "out" / "lvis_instances_results.json").read_text())
    assert sorted({r["category_id"] for r in written}) == [1, 2, 3]


# --- two processes ----------------------------------------------------------------------------


def _distributed_worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    import pickle

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        gt = json.loads(COCO_TINY_VAL.read_text())
        register_coco_tiny("coco_tiny_val_fast_eval", gt)
        image_ids = sorted(im["id"] for im in gt["images"])[:20]
        mine = image_ids[rank::world_size]  # interleaved, so the gathered order is shuffled
        evaluator = FastCOCOEvaluator("coco_tiny_val_fast_eval", distributed=True)
        res = _run_evaluator(evaluator, coco_model_outputs(gt, mine))
        with open(Path(out_dir) / f"rank{rank}.pkl", "wb") as f:
            pickle.dump(res, f)
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(coco_gt, tmp_path):
    import pickle

    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    with open(tmp_path / "rank0.pkl", "rb") as f:
        main = pickle.load(f)
    with open(tmp_path / "rank1.pkl", "rb") as f:
        other = pickle.load(f)
    assert other == {}

    register_coco_tiny("coco_tiny_val_fast_eval", coco_gt)
    image_ids = sorted(im["id"] for im in coco_gt["images"])[:20]
    single = _run_evaluator(
        FastCOCOEvaluator("coco_tiny_val_fast_eval", distributed=False),
        coco_model_outputs(coco_gt, image_ids),
    )
    assert list(main) == list(single) == ["bbox", "segm"]
    for task in single:
        assert main[task].keys() == single[task].keys()
        _assert_metrics_equal(main[task], single[task], single[task].keys())


# --- the benchmark tools ----------------------------------------------------------------------


def test_benchmark_lvis_results_mode(tmp_path, capsys):
    register_hand_lvis("fast_eval_bench_lvis", tmp_path)
    results_path = tmp_path / "results.json"
    results_path.write_text(json.dumps(hand_lvis_results(with_masks=True)))
    out = tmp_path / "bench.json"
    tool = load_tool("benchmark_lvis")
    tool.main(
        ["--results", str(results_path), "--dataset", "fast_eval_bench_lvis", "--json", str(out)]
    )
    report = json.loads(out.read_text())
    for task in ("bbox", "segm"):
        got = {k: float("nan") if v is None else v for k, v in report[task].items()}
        _assert_metrics_equal(got, HAND_EXPECTED, LVIS_METRICS)
    assert report["eval_seconds"] >= 0 and report["num_images"] == 3
    assert "APr" in capsys.readouterr().out


def test_benchmark_eval_small_run(tmp_path):
    tool = load_tool("benchmark_eval")
    out = tmp_path / "bench.json"
    assert (
        tool.main(
            [
                "--num-images",
                "12",
                "--objects",
                "5",
                "12",
                "--false-positives",
                "4",
                "10",
                "--repeat",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["agree"] and report["num_detections"] > 100
    for task in ("bbox", "segm"):
        assert report[task]["ours"]["AP"] == pytest.approx(report[task]["pycocotools"]["AP"])
        assert report[task]["faster-coco-eval"]["AP"] == pytest.approx(
            report[task]["pycocotools"]["AP"]
        )
        for name in ("ours", "faster-coco-eval", "pycocotools"):
            assert report[task][name]["seconds"] > 0
        assert report[task]["ratios"]["pycocotools/ours"] > 0
