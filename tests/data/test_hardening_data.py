"""Bad inputs: image files, caption json, instance json; skip-and-count and its threshold; the
resumable loader's determinism (README "Failure behaviour")."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import BoxMode
from helpers import REPO, virtex_cfg
from PIL import Image

from virtex_d2.data.caption_mapper import CaptionDatasetMapper
from virtex_d2.data.datasets.coco_captions import load_coco_captions_json
from virtex_d2.data.resumable import ResumableBatchSampler, ResumableTrainLoader, SampleStream
from virtex_d2.data.tokenizer import EOS_ID, SOS_ID
from virtex_d2.data.validation import (
    SKIPPED_KEY,
    BadDataError,
    BadSampleTracker,
    check_image_files,
    clean_instance_annotations,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Good files in awkward formats and broken files, all 64x64 unless noted."""
    d = tmp_path_factory.mktemp("images")
    Image.new("RGB", (64, 64), (200, 40, 40)).save(d / "rgb.jpg", quality=95)
    Image.new("L", (64, 64), 100).save(d / "gray.png")
    Image.new("RGB", (64, 64), (200, 40, 40)).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(d / "rgba.png")  # fully transparent
    Image.fromarray(np.full((64, 64), 32768, np.uint16)).save(d / "gray16.png")
    # Stored 64 wide x 32 tall, left half red; EXIF orientation 6 displays it rotated 90
    # degrees clockwise: 32 wide x 64 tall, red on top.
    stored = np.zeros((32, 64, 3), np.uint8)
    stored[:, :32], stored[:, 32:] = RED, BLUE
    img = Image.fromarray(stored)
    exif = img.getexif()
    exif[0x0112] = 6
    img.save(d / "exif.jpg", exif=exif, quality=95)
    good = (d / "rgb.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2)
    (d / "empty.jpg").write_bytes(b"")
    return d


def caption_cfg(tokenizer, max_len=30):
    cfg = virtex_cfg(tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    cfg.INPUT.VIRTEX.CROP_SIZE = 32
    cfg.INPUT.VIRTEX.TEST_RESIZE = 64
    cfg.INPUT.VIRTEX.TEST_CROP_SIZE = 64
    cfg.MODEL.VIRTEX.MAX_CAPTION_LENGTH = max_len
    return cfg


def record(path, h=64, w=64, image_id=0, **extra):
    return {
        "file_name": str(path),
        "image_id": image_id,
        "height": h,
        "width": w,
        "captions": ["a red circle left of a blue square"],
        **extra,
    }


def close(pixel, expected, tol):
    return all(abs(int(a) - b) <= tol for a, b in zip(pixel, expected))


# ---------------------------------------------------------------------------- image formats
def test_pixel_formats_and_exif_decode_to_upright_rgb(images, tokenizer):
    mapper = CaptionDatasetMapper(caption_cfg(tokenizer), is_train=False)
    expected = {
        "rgb.jpg": ((200, 40, 40), 8),
        "gray.png": ((100, 100, 100), 1),
        "cmyk.jpg": ((200, 40, 40), 12),
        "rgba.png": ((255, 255, 255), 0),
        "gray16.png": ((128, 128, 128), 1),
    }
    for name, (colour, tol) in expected.items():
        out = mapper(record(images / name))["image"]
        assert out.shape == (3, 64, 64) and out.dtype == torch.uint8, name
        assert close(out[:, 32, 32].tolist(), colour, tol), (name, out[:, 32, 32])
    # Upright: after resize (64 x 128) and centre crop, the top-right corner is red. Without the
    # EXIF rotation it would be blue.
    out = mapper(record(images / "exif.jpg", h=32, w=64))["image"]
    assert close(out[:, 5, 58].tolist(), RED, 40) and close(out[:, 58, 5].tolist(), BLUE, 40)


def detection_cfg(fmt="RGB"):
    cfg = get_cfg()
    cfg.INPUT.FORMAT = fmt
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 128
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.RANDOM_FLIP = "none"
    return cfg


def instance_record(path, h, w, box):
    return {
        "file_name": str(path),
        "image_id": 1,
        "height": h,
        "width": w,
        "annotations": [
            {"bbox": box, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0}
        ],
    }


def tracked_loader(records, mapper, batch_size: int, seed: int, max_bad: float):
    """The resumable loader with one worker and a bad-sample budget of ``max_bad``."""
    return ResumableTrainLoader(
        records,
        mapper,
        batch_size=batch_size,
        num_workers=1,
        seed=seed,
        tracker=BadSampleTracker(len(records), max_bad),
    )


def test_detectron2_mapper_failures_are_skipped_and_counted(images, tmp_path):
    """Detection fine-tuning maps with Detectron2's own DatasetMapper (``read_image``): a file it
    cannot decode, or whose json size disagrees with the pixels, is replaced and counted by the
    resumable loader, named, and the threshold applies; the worker does not crash."""
    mapper = DatasetMapper(detection_cfg(), is_train=True)
    shutil.copy(images / "rgb.jpg", tmp_path / "wrong_size.jpg")
    good = [
        instance_record(images / n, 64, 64, [8, 8, 16, 16])
        for n in ("rgb.jpg", "gray.png", "cmyk.jpg")
    ]
    # EXIF-rotated photo whose json has the upright size: fine.
    good.append(instance_record(images / "exif.jpg", h=64, w=32, box=[0, 0, 32, 32]))
    bad = [
        instance_record(images / "truncated.jpg", 64, 64, [8, 8, 16, 16]),
        instance_record(images / "corrupt.jpg", 64, 64, [8, 8, 16, 16]),
        instance_record(tmp_path / "wrong_size.jpg", h=32, w=64, box=[0, 0, 32, 32]),
    ]
    records = [{**r, "image_id": i} for i, r in enumerate(good + bad)]
    loader = tracked_loader(records, mapper, batch_size=2, seed=1, max_bad=0.5)
    good_names = {os.path.basename(r["file_name"]) for r in good}
    for batch, _ in zip(loader, range(12)):  # 24 samples: every record drawn (3+ epochs)
        assert len(batch) == 2
        assert all(len(d["instances"]) == 1 for d in batch)
        assert all(os.path.basename(d["file_name"]) in good_names for d in batch)
    reasons = {os.path.basename(k): v for k, v in loader.tracker.bad.items()}
    assert sorted(reasons) == ["corrupt.jpg", "truncated.jpg", "wrong_size.jpg"]
    assert reasons["truncated.jpg"].startswith("OSError")
    assert reasons["corrupt.jpg"].startswith("UnidentifiedImageError")
    assert reasons["wrong_size.jpg"].startswith(SizeMismatchError.__name__)

    strict = tracked_loader(records, mapper, batch_size=2, seed=1, max_bad=0.2)
    with pytest.raises(BadDataError, match="VIRTEX_MAX_BAD_FRACTION = 0.2"):  # 2 of 7 > 1
        for _ in zip(range(12), strict):
            pass


# ---------------------------------------------------------------- bad files: skip and count
GOOD = ("rgb.jpg", "gray.png", "cmyk.jpg", "rgba.png", "gray16.png", "exif.jpg")
BROKEN = ("truncated.jpg", "corrupt.jpg", "empty.jpg", "missing.jpg")


def test_check_image_files_drops_missing_and_empty_before_training(images):
    records = [record(images / n) for n in GOOD + BROKEN]
    kept, bad = check_image_files(records, max_fraction=0.5)
    assert [os.path.basename(r["file_name"]) for r in kept] == list(GOOD) + list(BROKEN[:2])
    assert {os.path.basename(k): v for k, v in bad.items()} == {
        "empty.jpg": "empty file (0 bytes)",
        "missing.jpg": "cannot stat: No such file or directory",
    }
    with pytest.raises(BadDataError, match="missing.jpg") as e:
        check_image_files(records, max_fraction=0.1)  # 2 of 10 > 1 allowed
    assert "VIRTEX_MAX_BAD_FRACTION" in str(e.value)


def test_bad_images_are_replaced_counted_and_stop_the_run_above_the_threshold(images, tokenizer):
    mapper = CaptionDatasetMapper(caption_cfg(tokenizer), is_train=True)
    records = [record(images / n, image_id=i) for i, n in enumerate(GOOD + BROKEN)]
    loader = tracked_loader(records, mapper, batch_size=4, seed=3, max_bad=0.5)
    it = iter(loader)
    for _ in range(8):  # 32 samples: every record is drawn at least once (3+ epochs)
        batch = next(it)
        assert len(batch) == 4
        assert all("image" in d and SKIPPED_KEY not in d for d in batch)
        assert all(os.path.basename(d["file_name"]) in GOOD for d in batch)
    bad = {os.path.basename(k): v for k, v in loader.tracker.bad.items()}
    assert sorted(bad) == sorted(BROKEN)
    assert "UnreadableImageError" in bad["truncated.jpg"] and "empty" in bad["empty.jpg"]
    assert loader.tracker.replacements >= 4

    strict = tracked_loader(records, mapper, batch_size=4, seed=3, max_bad=0.25)
    with pytest.raises(BadDataError) as e:  # 3 of 10 > 2 allowed: raised in the main process
        for _ in zip(range(8), strict):
            pass
    assert "DATALOADER.VIRTEX_MAX_BAD_FRACTION = 0.25" in str(e.value)
    assert sum(n in str(e.value) for n in BROKEN) >= 3


def test_every_record_broken_stops_with_the_reasons_not_a_worker_traceback(images, tokenizer):
    mapper = CaptionDatasetMapper(caption_cfg(tokenizer), is_train=True)
    records = [record(images / n) for n in BROKEN[:2]]
    loader = tracked_loader(records, mapper, batch_size=2, seed=0, max_bad=1.0)
    with pytest.raises(BadDataError, match="records in a row failed") as e:
        next(iter(loader))
    assert "truncated.jpg" in str(e.value) and "Traceback" in str(e.value)


# ------------------------------------------------------------------------- determinism
def test_sample_stream_epochs_and_random_access():
    s = SampleStream(7, seed=5)
    assert sorted(s.epoch_indices(0)) == list(range(7)) and sorted(s.epoch_indices(3)) == list(
        range(7)
    )
    assert list(s.epoch_indices(0)) != list(s.epoch_indices(1))
    seq = [s.index_at(p) for p in range(40)]
    fresh = SampleStream(7, seed=5)
    assert [fresh.index_at(p) for p in range(39, -1, -1)] == seq[::-1]
    factors = [1.0, 1.0, 2.5, 1.0, 4.0]
    r = SampleStream(5, seed=1, repeat_factors=factors)
    lengths = {len(r.epoch_indices(e)) for e in range(6)}
    assert lengths <= {9, 10} and len(lengths) == 2  # 1+1+2(or 3)+1+4
    seq = [r.index_at(p) for p in range(60)]
    fresh = SampleStream(5, 1, factors)  # random access, backwards
    assert [fresh.index_at(p) for p in range(59, -1, -1)] == seq[::-1]
    assert seq.count(4) > 3 * seq.count(0)


def test_batch_sampler_resumes_mid_stream_with_and_without_grouping():
    stream = SampleStream(11, seed=2)
    groups = np.array([i % 3 == 0 for i in range(11)], dtype=np.int64)
    for group_ids in (None, groups):
        ranks = []
        for rank in range(2):
            full = ResumableBatchSampler(stream, 3, rank, 2, group_ids)
            first = [b for b, _ in zip(full, range(9))]
            later = ResumableBatchSampler(stream, 3, rank, 2, group_ids)
            later.start_batch = 4
            assert [b for b, _ in zip(later, range(5))] == first[4:]
            if group_ids is not None:
                assert all(len({groups[stream.index_at(p)] for p in b}) == 1 for b in first)
            ranks.append({p for b in first for p in b})
        assert not ranks[0] & ranks[1]  # ranks never share a sample position


def test_loader_output_depends_on_position_not_on_workers_or_start(synthetic, tokenizer):
    records = DatasetCatalog.get("synthetic_captions_train")[:10]
    mapper = CaptionDatasetMapper(caption_cfg(tokenizer), is_train=True)

    def batches(workers, start, n):
        loader = ResumableTrainLoader(records, mapper, batch_size=3, num_workers=workers, seed=9)
        loader.start_iter = start
        return [
            [(d["image_id"], d["caption"], d["image"]) for d in b] for b, _ in zip(loader, range(n))
        ]

    def same(a, b):
        return all(
            x[0] == y[0] and x[1] == y[1] and torch.equal(x[2], y[2])
            for ba, bb in zip(a, b)
            for x, y in zip(ba, bb)
        ) and len(a) == len(b)

    base = batches(0, 0, 4)
    assert same(batches(2, 0, 4), base)
    assert same(batches(0, 2, 2), base[2:])
    # ... and the augmentations are random: the same record looks different in another epoch.
    assert len({(d[0], d[2].sum().item()) for b in base for d in b}) > 10


# ------------------------------------------------------------------------- caption json
def test_caption_json_policies(tmp_path, tokenizer, caplog):
    long_caption = " ".join(["red circle left of the blue square"] * 20)
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in range(5)]
    anns = [
        {"id": 10, "image_id": 0, "caption": "  A red circle.  "},
        {"id": 11, "image_id": 1, "caption": "   \t\n"},  # whitespace only
        {"id": 12, "image_id": 1},  # no caption field
        {"id": 13, "image_id": 2, "caption": 123},  # not text
        {"id": 14, "image_id": 3, "caption": "Ein großer 🐶 dog, très café 犬"},
        {"id": 15, "image_id": 4, "caption": long_caption},
    ]
    path = tmp_path / "caps.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    with caplog.at_level("WARNING"):
        recs = load_coco_captions_json(str(path), str(tmp_path))
    assert [r["image_id"] for r in recs] == [0, 3, 4]  # images 1 and 2 lost all captions
    assert recs[0]["captions"] == ["A red circle."]
    assert "dropped 3 missing or empty caption(s)" in caplog.text
    assert "annotation ids [11, 12, 13])" in caplog.text
    assert "dropped 2 image(s) without captions (image ids [1, 2]" in caplog.text

    mapper = CaptionDatasetMapper(caption_cfg(tokenizer, max_len=12), is_train=False)
    emoji = mapper.tokenize(recs[1]["captions"][0])
    assert emoji[0] == SOS_ID and emoji[-1] == EOS_ID and max(emoji) < len(tokenizer)
    clipped = mapper.tokenize(long_caption)
    assert len(clipped) == 12 and clipped[-1] == EOS_ID

    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns + [{"id": 99, "image_id": 42, "caption": "an orphan"}],
            }
        )
    )
    with pytest.raises(ValueError, match="annotation id 99 refers to image id 42"):
        load_coco_captions_json(str(path), str(tmp_path))
    path.write_text(json.dumps({"images": [{"id": 0, "height": 1, "width": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"image #0 lacks the required field\(s\) \['file_name'\]"):
        load_coco_captions_json(str(path), str(tmp_path))
    path.write_text(json.dumps({"images": images + images[:1], "annotations": anns}))
    with pytest.raises(ValueError, match="image id 0 appears more than once"):
        load_coco_captions_json(str(path), str(tmp_path))
    path.write_text(json.dumps({"images": [{**images[0], "file_name": " "}], "annotations": []}))
    with pytest.raises(ValueError, match="image id 0 has file_name ' '"):
        load_coco_captions_json(str(path), str(tmp_path))


def test_evaluation_stops_at_an_unreadable_image_naming_it(images, tokenizer):
    from virtex_d2.data.image_io import UnreadableImageError

    mapper = CaptionDatasetMapper(caption_cfg(tokenizer), is_train=False)
    with pytest.raises(UnreadableImageError, match="truncated.jpg"):
        mapper(record(images / "truncated.jpg"))


# ------------------------------------------------------------------------ instance json
def write_bad_instances(d):
    """Three 64x64 images; image 3 has only unusable annotations."""
    for i in (1, 2, 3):
        Image.new("RGB", (64, 64), (90, 90, 90)).save(d / f"{i}.jpg")
    square = [[10, 10, 30, 10, 30, 30, 10, 30]]
    anns = [
        {"bbox": [10, 10, 20, 20], "segmentation": square, "image_id": 1},  # fine
        {"bbox": [5, 5, 0, 10], "segmentation": square, "image_id": 1},  # zero width
        {"bbox": [5, 5, 10, -4], "segmentation": square, "image_id": 1},  # negative height
        {"bbox": [50, 50, 40, 40], "segmentation": [[50, 50, 90, 50, 90, 90]], "image_id": 2},
        {
            "bbox": [10, 10, 20, 20],
            "segmentation": [[10, 10, 30, 10, 30, 30], [1, 2, 3, 4]],
            "image_id": 2,
        },  # one valid polygon, one with 2 points
        {"bbox": [10, 10, 20, 20], "segmentation": [], "image_id": 3},  # empty polygon list
        {
            "bbox": [100, 100, 10, 10],
            "segmentation": [[100, 100, 110, 100, 110, 110]],
            "image_id": 3,
        },  # entirely outside
        {"segmentation": square, "image_id": 3},  # no bbox
    ]
    for k, a in enumerate(anns):
        a.update(id=k + 1, category_id=1 + k % 2, iscrowd=0, area=100.0)
    data = {
        "images": [
            {"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in (1, 2, 3)
        ],
        "annotations": anns,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    (d / "instances.json").write_text(json.dumps(data))
    return d / "instances.json"


def test_instance_annotations_are_clipped_or_dropped_with_counts(tmp_path):
    path = write_bad_instances(tmp_path)
    records = load_coco_json(str(path), str(tmp_path), None)
    boxes_only, counts = clean_instance_annotations(records, filter_empty=True)
    assert [len(r["annotations"]) for r in boxes_only] == [1, 2, 1]  # image 3: the [] one
    cleaned, counts = clean_instance_annotations(records, filter_empty=True, require_mask=True)
    assert [r["image_id"] for r in cleaned] == [1, 2]
    assert counts["annotations dropped: no valid mask (empty or invalid polygons)"] == 1
    assert counts["annotations dropped: degenerate box (width or height <= 0)"] == 2
    assert counts["annotations dropped: box entirely outside the image"] == 1
    assert counts["annotations dropped: missing or non-numeric bbox"] == 1
    assert counts["images dropped: no usable non-crowd annotation"] == 1
    assert counts["boxes clipped to the image"] == 1
    assert counts["polygons clipped to the image"] == 1
    anns2 = cleaned[1]["annotations"]
    assert anns2[0]["bbox"] == [50.0, 50.0, 14.0, 14.0]
    assert anns2[0]["segmentation"] == [[50.0, 50.0, 64.0, 50.0, 64.0, 64.0]]
    # The 2-point polygon: dropped by Detectron2's loader already, or here.
    assert all(len(p) >= 6 for a in anns2 for p in a["segmentation"])


def test_mask_rcnn_trains_on_the_bad_instance_json(tmp_path):
    from detectron2.data.datasets import register_coco_instances

    from virtex_d2 import add_virtex_config
    from virtex_d2.engine.trainer import Trainer

    path = write_bad_instances(tmp_path)
    name = "hardening_bad_instances"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(path), str(tmp_path))
    cfg = get_cfg()
    add_virtex_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "synthetic" / "mask_rcnn_R_18_FPN.yaml"))
    cfg.merge_from_list(
        [
            "DATASETS.TRAIN",
            f"('{name}',)",
            "DATASETS.TEST",
            "()",
            "MODEL.WEIGHTS",
            "",
            "MODEL.ROI_HEADS.NUM_CLASSES",
            "2",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "16",
            "MODEL.RPN.BATCH_SIZE_PER_IMAGE",
            "32",
            "MODEL.FPN.OUT_CHANNELS",
            "32",
            "INPUT.MIN_SIZE_TRAIN",
            "(64,)",
            "INPUT.MAX_SIZE_TRAIN",
            "96",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.CHECKPOINT_PERIOD",
            "100",
            "DATALOADER.NUM_WORKERS",
            "0",
            "TEST.PRECISE_BN.ENABLED",
            "False",
            "OUTPUT_DIR",
            str(tmp_path / "out"),
        ]
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert trainer.storage.history("data/bad_records").latest() == 0


def test_annotation_file_rejected_by_detectron2_stops_before_training(tmp_path):
    from detectron2.data.datasets.lvis import load_lvis_json

    from virtex_d2.data.train_loader import load_training_records

    (tmp_path / "train2017").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "train2017" / "1.jpg")
    data = {
        "images": [{"id": 1, "height": 64, "width": 64, "coco_url": "http://x/train2017/1.jpg"}],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 1,
                "bbox": [1, 1, 9, 9],
                "area": 81.0,
                "segmentation": [[1, 1, 9, 1]],
            }
        ],  # 2 points
        "categories": [{"id": 1, "name": "a", "frequency": "f", "image_count": 1}],
    }
    path = tmp_path / "lvis_bad.json"
    path.write_text(json.dumps(data))
    name = "hardening_bad_lvis"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_lvis_json(str(path), str(tmp_path) + "/", None))
    MetadataCatalog.get(name).set(json_file=str(path))
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(BadDataError, match="lvis_bad.json.*failed before training started"):
        load_training_records(cfg)
