"""Dataset registration rooted at $DETECTRON2_DATASETS, automatic generation of the
synthetic data, and the COCO Captions loader on real COCO files."""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from helpers import COCO_TINY, needs_coco_tiny
from iopath.common.file_io import file_lock

import virtex_d2
from virtex_d2.data.datasets import builtin, load_coco_captions_json
from virtex_d2.data.datasets.builtin import (
    register_all_virtex_datasets,
    register_synthetic_datasets,
)
from virtex_d2.data.datasets.synthetic import LVIS_CATEGORY_NAMES, MARKER_NAME

# pycocotools 2.0.11 warns inside mask.decode on numpy >= 2 on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
SYNTHETIC = [f"synthetic_{k}_{s}" for k in ("captions", "coco", "lvis") for s in ("train", "val")]


@contextlib.contextmanager
def capture_logs():
    """Messages logged under "virtex_d2" at INFO and above. A handler on that logger itself,
    not caplog's root handler, still sees them if something set propagate=False on it (as
    detectron2's setup_logger does)."""
    messages = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("virtex_d2")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Registrations re-rooted at an empty temporary $DETECTRON2_DATASETS for this module."""
    path = tmp_path_factory.mktemp("d2_datasets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DETECTRON2_DATASETS", str(path))
        register_all_virtex_datasets()
        yield path
    register_all_virtex_datasets()  # back to the environment's root for other modules


@pytest.fixture(scope="module")
def generated(root):
    """First load of a synthetic dataset, starting from an interrupted earlier generation
    (a partial file, no marker) and a lock left by a dead process."""
    (root / "synthetic" / "annotations").mkdir(parents=True)
    (root / "synthetic" / "annotations" / "captions_train.json").write_text('{"images": [')
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys\n"
            "from iopath.common.file_io import file_lock\n"
            "file_lock(sys.argv[1]).acquire()\nos._exit(1)",
            str(root / "synthetic"),
        ],
        check=False,
        timeout=60,
    )
    assert (root / "synthetic.lock").is_file()
    # Fail here, not after ensure_synthetic_dataset's 15-minute wait, if the lock is not freed.
    lock = file_lock(str(root / "synthetic"))
    lock.acquire(timeout=5)
    lock.release()

    with capture_logs() as logs:
        start = time.perf_counter()
        dicts = DatasetCatalog.get("synthetic_captions_train")
        seconds = time.perf_counter() - start
    return {"dicts": dicts, "logs": logs, "seconds": seconds}


def test_names_and_metadata_without_reading_files(tmp_path, root):
    register_synthetic_datasets(str(tmp_path))  # registering must not generate anything
    try:
        assert list(tmp_path.iterdir()) == []
        for name in SYNTHETIC:
            meta = MetadataCatalog.get(name)
            assert meta.json_file.startswith(str(tmp_path / "synthetic"))
            kind = name.split("_")[1]
            assert meta.evaluator_type == {"captions": "captioning"}.get(kind, kind)
        assert MetadataCatalog.get("synthetic_coco_train").thing_classes[0] == "circle"
        assert MetadataCatalog.get("synthetic_lvis_val").thing_classes == LVIS_CATEGORY_NAMES
        assert MetadataCatalog.get("synthetic_lvis_val").image_root.endswith(os.sep)
    finally:
        register_all_virtex_datasets()  # the module's root again
    for split in ("train", "val"):
        meta = MetadataCatalog.get(f"coco_captions_2017_{split}")
        assert meta.evaluator_type == "captioning"
        assert meta.json_file == str(root / "coco" / "annotations" / f"captions_{split}2017.json")
        assert meta.image_root == str(root / "coco" / f"{split}2017")
    # Detectron2's own datasets are untouched.
    assert MetadataCatalog.get("coco_2017_train").evaluator_type == "coco"
    assert "lvis_v1_train" in DatasetCatalog.list()


def test_importing_again_and_reloading_keep_registrations(root):
    importlib.reload(importlib.import_module("virtex_d2"))
    importlib.reload(builtin)
    for name in SYNTHETIC + ["coco_captions_2017_train", "coco_captions_2017_val"]:
        assert name in DatasetCatalog.list()
    assert MetadataCatalog.get("synthetic_coco_val").json_file.startswith(str(root))
    assert virtex_d2.__version__


def test_first_load_generates_with_a_log_line(root, generated):
    logs = " | ".join(generated["logs"])
    assert f"Synthetic dataset not found in {root / 'synthetic'}" in logs
    assert "stale lock" in logs
    assert (root / "synthetic" / MARKER_NAME).is_file()
    assert not (root / "synthetic.lock").exists()
    # Informational only (timings are benchmarks' business, not assertions): 3-5 s here.
    print(f"default generation + first load: {generated['seconds']:.1f}s")


def test_synthetic_captions_records(root, generated):
    dicts = generated["dicts"]
    assert len(dicts) == 600
    for d in dicts[:50]:
        assert os.path.isfile(d["file_name"]) and d["height"] == d["width"] == 128
        assert len(d["captions"]) == 5 and all(c.strip() for c in d["captions"])
        assert d["labels"] == sorted(set(d["labels"])) and set(d["labels"]) <= set(range(7))
        assert d["labels"]
    assert MetadataCatalog.get("synthetic_captions_train").thing_classes[1] == "square"


def test_second_load_does_not_regenerate(root, generated):
    marker = root / "synthetic" / MARKER_NAME
    before = marker.stat().st_mtime_ns
    assert len(DatasetCatalog.get("synthetic_captions_val")) == 100
    assert marker.stat().st_mtime_ns == before


def test_synthetic_coco_loads_with_detectron2(root, generated):
    dicts = DatasetCatalog.get("synthetic_coco_val")
    assert len(dicts) == 100 and os.path.isfile(dicts[0]["file_name"])
    anns = [a for d in dicts for a in d["annotations"]]
    assert {a["category_id"] for a in anns} == set(range(7))
    assert any(a["iscrowd"] for a in anns)
    assert any(isinstance(a["segmentation"], dict) for a in anns)
    meta = MetadataCatalog.get("synthetic_coco_val")
    assert sorted(meta.thing_dataset_id_to_contiguous_id) != list(range(1, 8))


@pytest.mark.parametrize("split", ["train", "val"])
def test_synthetic_lvis_loads_with_all_frequency_groups(root, generated, split):
    dicts = DatasetCatalog.get(f"synthetic_lvis_{split}")
    assert os.path.isfile(dicts[0]["file_name"])
    assert dicts[0]["file_name"].startswith(str(root / "synthetic" / split))
    assert all("neg_category_ids" in d and "not_exhaustive_category_ids" in d for d in dicts)
    meta = MetadataCatalog.get(f"synthetic_lvis_{split}")
    assert len(meta.thing_frequencies) == len(meta.thing_classes) == len(LVIS_CATEGORY_NAMES)
    assert len(meta.class_image_count) == len(LVIS_CATEGORY_NAMES)
    used = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert used <= set(range(len(LVIS_CATEGORY_NAMES)))
    # Rare, common and frequent categories all occur in this split (LVIS definition, train
    # image counts), independently recomputed from the train file.
    with open(root / "synthetic" / "annotations" / "lvis_train.json") as f:
        train = json.load(f)
    images = {}
    for a in train["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
    group = {
        c - 1: "r" if len(v) <= 10 else "c" if len(v) <= 100 else "f" for c, v in images.items()
    }
    assert [group.get(c, "r") for c in range(len(LVIS_CATEGORY_NAMES))] == meta.thing_frequencies
    assert {group[c] for c in used} == {"r", "c", "f"}


@needs_coco_tiny
def test_coco_captions_2017_registration(root):
    """coco_captions_2017_val reads coco/annotations/captions_val2017.json and adds labels
    when instances_val2017.json exists."""
    ann_dir = root / "coco" / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    data = json.loads((COCO_TINY / "annotations" / "captions_subset.json").read_text())
    val_ids = {img["id"] for img in data["images"] if img["split_dir"] == "val2017"}
    data["images"] = [
        {k: v for k, v in img.items() if k != "split_dir"}
        for img in data["images"]
        if img["id"] in val_ids
    ]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in val_ids]
    (ann_dir / "captions_val2017.json").write_text(json.dumps(data))
    assert "labels" not in DatasetCatalog.get("coco_captions_2017_val")[0]
    shutil.copy(COCO_TINY / "annotations" / "instances_val2017.json", ann_dir)
    dicts = DatasetCatalog.get("coco_captions_2017_val")
    assert len(dicts) == len(val_ids) == 12
    for d in dicts:
        assert d["labels"]
        assert d["file_name"] == str(root / "coco" / "val2017" / Path(d["file_name"]).name)
    assert len(MetadataCatalog.get("coco_captions_2017_val").thing_classes) == 80


@needs_coco_tiny
def test_loader_on_real_coco_with_split_dirs():
    name = "test_coco_tiny_captions"
    try:
        dicts = load_coco_captions_json(
            str(COCO_TINY / "annotations" / "captions_subset.json"),
            str(COCO_TINY),
            dataset_name=name,
            instances_json=[
                str(COCO_TINY / "annotations" / "instances_train2017.json"),
                str(COCO_TINY / "annotations" / "instances_val2017.json"),
            ],
        )
        assert len(dicts) == 17 and sum(len(d["captions"]) for d in dicts) == 85
        assert [d["image_id"] for d in dicts] == sorted(d["image_id"] for d in dicts)
        for d in dicts:
            assert os.path.isfile(d["file_name"]), d["file_name"]
            assert d["captions"] == [c.strip() for c in d["captions"]] and all(d["captions"])
            assert d["labels"] and all(0 <= k < 80 for k in d["labels"])
        classes = MetadataCatalog.get(name).thing_classes
        assert classes[0] == "person" and len(classes) == 80
    finally:
        MetadataCatalog.remove(name)


def _write(path: Path, images, annotations) -> str:
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


IMG = {"id": 7, "file_name": "a.jpg", "height": 10, "width": 12}


def test_loader_errors_name_the_file_and_record(tmp_path):
    bad = _write(tmp_path / "unknown.json", [IMG], [{"id": 41, "image_id": 8, "caption": "x"}])
    with pytest.raises(ValueError, match=r"unknown\.json.*annotation id 41.*image id 8"):
        load_coco_captions_json(bad, str(tmp_path))
    no_name = _write(tmp_path / "noname.json", [{"id": 7, "height": 1, "width": 1}], [])
    with pytest.raises(ValueError, match=r"noname\.json: image #0 .*file_name"):
        load_coco_captions_json(no_name, str(tmp_path))
    no_image_id = _write(tmp_path / "noimg.json", [IMG], [{"id": 3, "caption": "x"}])
    with pytest.raises(ValueError, match=r"noimg\.json: annotation #0 .*image_id"):
        load_coco_captions_json(no_image_id, str(tmp_path))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json is not valid json"):
        load_coco_captions_json(str(tmp_path / "broken.json"), str(tmp_path))
    good = _write(tmp_path / "good.json", [IMG], [{"id": 1, "image_id": 7, "caption": "x"}])
    other = tmp_path / "instances.json"
    other.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    with pytest.raises(ValueError, match="id 7.*instances"):
        load_coco_captions_json(good, str(tmp_path), instances_json=str(other))


def test_loader_drops_and_counts_empty_captions_and_uncaptioned_images(tmp_path):
    images = [IMG, {**IMG, "id": 9, "file_name": "b.jpg"}]
    anns = [
        {"id": 1, "image_id": 7, "caption": " A red circle. \n"},
        {"id": 2, "image_id": 7, "caption": "   "},
        {"id": 3, "image_id": 9},
    ]
    path = _write(tmp_path / "caps.json", images, anns)
    with capture_logs() as logs:
        dicts = load_coco_captions_json(path, str(tmp_path / "imgs"))
    assert dicts == [
        {
            "file_name": str(tmp_path / "imgs" / "a.jpg"),
            "image_id": 7,
            "height": 10,
            "width": 12,
            "captions": ["A red circle."],
        }
    ]
    assert any("dropped 2 missing or empty caption(s)" in m for m in logs)
    assert any("dropped 1 image(s) without captions" in m for m in logs)
