"""Classification transfer: datasets, mapper, ImageClassifier (linear probe / fine-tuning),
evaluator, VOC07 SVM protocol and tool (with its feature cache), configs."""

from __future__ import annotations

import json
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import REPO, learning_rates, load_config, load_tool
from PIL import Image, ImageDraw

import virtex_d2
import virtex_d2.engine.features as features_mod
from virtex_d2.checkpoint.convert import (
    IncompleteBackboneError,
    convert_checkpoint,
    save_d2_checkpoint,
)
from virtex_d2.data.classification_mapper import (
    ClassificationDatasetMapper,
    build_classification_test_loader,
    build_classification_train_loader,
)
from virtex_d2.data.datasets import (
    load_coco_instances_classification,
    load_image_folder,
    load_multilabel_targets,
    register_classification_datasets,
    register_image_folder,
    register_inat_json,
)
from virtex_d2.engine.features import load_backbone_weights
from virtex_d2.evaluation.classification import RESULTS_FILE_NAME, ClassificationEvaluator
from virtex_d2.evaluation.voc07_svm import SVMSettings, run_svm_protocol
from virtex_d2.modeling.classifier import ImageClassifier
from virtex_d2.solver import build_classification_optimizer

CLS_CONFIGS = sorted((REPO / "configs" / "classification").glob("*.yaml"))
SYN_CONFIGS = [
    REPO / "configs" / "synthetic" / f"{n}_R_18.yaml" for n in ("linear_probe", "finetune")
]
LEAVES = [p for p in CLS_CONFIGS if not p.name.startswith("Base-")]
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220)}


def load_cfg(path: Path = SYN_CONFIGS[0], opts=()):
    return load_config(path, *opts)


def draw(rng: np.random.Generator, size: int, shapes) -> np.ndarray:
    """A noisy grey image with one filled shape per (colour name, scale) in ``shapes``."""
    base = rng.integers(90, 160, (size, size, 3), dtype=np.uint8)
    img = Image.fromarray(base)
    d = ImageDraw.Draw(img)
    for colour, scale in shapes:
        s = int(size * scale)
        x0, y0 = (int(v) for v in rng.integers(0, size - s, 2))
        box = [x0, y0, x0 + s, y0 + s]
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=COLOURS[colour])
    return np.asarray(img)


def write_image_folder(root: Path, per_class: int, classes=tuple(COLOURS), size: int = 64) -> Path:
    rng = np.random.default_rng(len(classes) * 100 + per_class)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(draw(rng, size, [(c, 0.5)])).save(root / c / f"{c}_{i}.png")
    return root


def write_tiny_voc(root: Path, n_trainval: int = 36, n_test: int = 24, size: int = 64) -> Path:
    """VOC layout with colour classes; every 5th image also holds a small *difficult* object
    of a colour that is otherwise absent."""
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(7)
    names = list(COLOURS)
    ids = {"trainval": [], "test": []}
    for i in range(n_trainval + n_test):
        split = "trainval" if i < n_trainval else "test"
        fid = f"{i:06d}"
        ids[split].append(fid)
        present = [names[j] for j in rng.choice(3, size=1 + i % 2, replace=False)]
        objects = [(c, 0.45, 0) for c in present]
        absent = [c for c in names if c not in present]
        if i % 5 == 0 and absent:
            objects.append((absent[0], 0.12, 1))
        img = draw(rng, size, [(c, s) for c, s, _ in objects])
        Image.fromarray(img).save(root / "JPEGImages" / f"{fid}.jpg", quality=95)
        ann = ET.Element("annotation")
        sz = ET.SubElement(ann, "size")
        for tag, v in (("width", size), ("height", size), ("depth", 3)):
            ET.SubElement(sz, tag).text = str(v)
        for c, _, difficult in objects:
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = c
            ET.SubElement(obj, "difficult").text = str(difficult)
            box = ET.SubElement(obj, "bndbox")
            for tag in ("xmin", "ymin", "xmax", "ymax"):  # boxes are unused by classification
                ET.SubElement(box, tag).text = "1"
        ET.ElementTree(ann).write(root / "Annotations" / f"{fid}.xml")
    for split, fids in ids.items():
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(fids) + "\n")
    return root


def register_tiny_voc(root: Path) -> tuple:
    tag = uuid.uuid4().hex[:8]
    names = (f"voc_tiny_{tag}_trainval", f"voc_tiny_{tag}_test")
    for name, split in zip(names, ("trainval", "test")):
        register_pascal_voc(name, str(root), split, 2007, class_names=tuple(COLOURS))
    return names


def r18_checkpoints(tmp_path: Path, seed: int = 0) -> tuple:
    """(raw checkpoint with the ResNet under ``backbone.``, its converted D2 file, state)."""
    torch.manual_seed(seed)
    model = ImageClassifier(load_cfg(SYN_CONFIGS[1]))
    raw = tmp_path / f"raw_{seed}.pth"
    torch.save({"model": model.state_dict(), "iteration": 0}, raw)
    converted = tmp_path / f"r18_d2_{seed}.pth"
    save_d2_checkpoint(convert_checkpoint(str(raw), "virtex_d2"), str(converted))
    return raw, converted, {k: v.clone() for k, v in model.backbone.state_dict().items()}


def batch_of(n: int, size: int = 64, num_classes: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
         "label": int(torch.randint(0, num_classes, (1,), generator=g))}
        for _ in range(n)
    ]  # fmt: skip


# ------------------------------------------------------------------------------------ configs
@pytest.mark.parametrize("path", CLS_CONFIGS + SYN_CONFIGS, ids=lambda p: p.name)
def test_config_merges_builds_and_follows_the_common_conventions(path):
    cfg = load_cfg(path)
    model = build_model(cfg)
    assert isinstance(model, ImageClassifier)
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.INPUT.FORMAT == "RGB" and cfg.MODEL.RESNETS.NORM == "BN"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert model.classifier.out_features == cfg.MODEL.CLASSIFIER.NUM_CLASSES
    assert model.feature_dim == (2048 if cfg.MODEL.RESNETS.DEPTH == 50 else 512)
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"classifier"} if cfg.MODEL.CLASSIFIER.FREEZE_BACKBONE
                         else {"backbone", "classifier"})  # fmt: skip


def test_linear_probe_schedule_starts_at_full_lr_and_halves_midway():
    """The linear probe's schedule as the optimiser sees it: no warm-up, then cosine."""
    lin = load_cfg(REPO / "configs/classification/imagenet_linear_R_50_virtex.yaml")
    # No warmup, then cosine: full LR at the start, half of it midway (one tiny optimiser).
    lin.merge_from_list(["SOLVER.MAX_ITER", 100])
    lrs = learning_rates(lin, 51)
    assert lrs[0] == pytest.approx(0.3) and lrs[50] == pytest.approx(0.15, rel=1e-3)


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: p.name)
def test_leaf_sets_only_initialisation(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {"_BASE_", "MODEL", "OUTPUT_DIR"}
    assert set(raw.get("MODEL", {})) <= {"WEIGHTS"}
    init = path.stem.rsplit("_", 1)[1]
    expected = {"random": "", "imagenet": "output/torchvision_R_50_d2.pth",
                "virtex": "output/virtex_R_50_d2.pth"}[init]  # fmt: skip
    assert load_cfg(path).MODEL.WEIGHTS == expected
    if init != "random":
        assert "tools/convert_to_d2.py" in path.read_text()


@pytest.mark.parametrize("path", SYN_CONFIGS, ids=lambda p: p.name)
def test_synthetic_configs_match_the_registered_dataset(path):
    cfg = load_cfg(path)
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST):
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "classification"
        assert len(meta.thing_classes) == cfg.MODEL.CLASSIFIER.NUM_CLASSES


# ----------------------------------------------------------------------------------- datasets
def test_registration_reads_no_file_and_loading_names_the_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    try:
        register_classification_datasets(str(missing))  # must not touch the disk
        assert not missing.exists()
        with pytest.raises(FileNotFoundError, match="nowhere/imagenet/train"):
            DatasetCatalog.get("imagenet_train")
        with pytest.raises(FileNotFoundError, match="train2018.json"):
            DatasetCatalog.get("inat2018_train")
    finally:
        register_classification_datasets()


def test_image_folder_labels_follow_the_class_root(tmp_path):
    train = write_image_folder(tmp_path / "train", 2)
    val = write_image_folder(tmp_path / "val", 1, classes=("blue", "red"))  # "green" missing
    name = f"folder_{uuid.uuid4().hex[:8]}"
    register_image_folder(name, str(val), class_root=str(train))
    records = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).thing_classes == ["blue", "green", "red"]
    assert MetadataCatalog.get(name).evaluator_type == "classification"
    assert sorted((r["image_id"], r["label"]) for r in records) == [
        ("blue/blue_0.png", 0), ("red/red_0.png", 2)]  # fmt: skip
    assert all(Path(r["file_name"]).is_file() for r in records)
    assert [r["label"] for r in load_image_folder(str(train))] == [0, 0, 1, 1, 2, 2]
    (val / "purple").mkdir()
    with pytest.raises(ValueError, match="purple"):
        load_image_folder(str(val), str(train))


def test_inat_json_labels_index_sorted_category_ids(tmp_path):
    cats = [{"id": 9, "name": "c9"}, {"id": 2, "name": "c2"}, {"id": 5, "name": "c5"}]
    images = [{"id": i, "file_name": f"train_val2018/x/{i}.jpg", "width": 8, "height": 6}
              for i in range(3)]  # fmt: skip
    anns = [{"id": 10 + i, "image_id": i, "category_id": c} for i, c in enumerate((5, 9, 2))]
    json_file = tmp_path / "train2018.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    name = f"inat_{uuid.uuid4().hex[:8]}"
    register_inat_json(name, str(json_file), str(tmp_path))
    records = DatasetCatalog.get(name)
    assert [r["label"] for r in records] == [1, 2, 0]
    assert records[0]["file_name"] == str(tmp_path / "train_val2018/x/0.jpg")
    assert MetadataCatalog.get(name).thing_classes == ["c2", "c5", "c9"]

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": images, "annotations": anns[:2], "categories": cats}))
    with pytest.raises(ValueError, match="image 2 .*no annotation"):
        virtex_d2.data.datasets.load_inat_json(str(bad), str(tmp_path))
    two = anns + [{"id": 99, "image_id": 0, "category_id": 2}]
    bad.write_text(json.dumps({"images": images, "annotations": two, "categories": cats}))
    with pytest.raises(ValueError, match="two categories"):
        virtex_d2.data.datasets.load_inat_json(str(bad), str(tmp_path))


def test_coco_instances_label_is_the_largest_object(tmp_path):
    cats = [{"id": 40, "name": "ellipse"}, {"id": 3, "name": "circle"}, {"id": 7, "name": "square"}]
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 64} for i in (1, 2, 3)]
    rows = [  # (image, category, area or None, box side, crowd)
        (1, 3, 50.0, 9, 0), (1, 40, 400.0, 30, 0), (1, 7, 900.0, 40, 1),
        (2, 7, None, 10, 0),  # no "area": the box area is used
        (3, 7, 99.0, 9, 1),
    ]  # fmt: skip
    anns = []
    for i, (image_id, cat, area, side, crowd) in enumerate(rows):
        ann = {"id": i, "image_id": image_id, "category_id": cat, "bbox": [0, 0, side, side],
               "iscrowd": crowd}  # fmt: skip
        anns.append(ann if area is None else {**ann, "area": area})
    json_file = tmp_path / "instances.json"
    json_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    records = load_coco_instances_classification(str(json_file), str(tmp_path))
    # classes by id: circle(3)=0, square(7)=1, ellipse(40)=2; the crowd square is ignored and
    # image 3 (crowd only) has no label.
    assert [(r["image_id"], r["label"], r["labels"]) for r in records] == [
        (1, 2, [0, 2]), (2, 1, [1])]  # fmt: skip


def test_voc_targets_keep_difficult_only_as_zero(tmp_path):
    voc = write_tiny_voc(tmp_path / "VOC2007", n_trainval=6, n_test=3)
    trainval, _ = register_tiny_voc(voc)
    records, targets, classes = load_multilabel_targets(trainval)
    assert classes == list(COLOURS) and targets.shape == (6, 3) and len(records) == 6
    for r, t in zip(records, targets):
        objs = ET.parse(voc / "Annotations" / f"{r['image_id']}.xml").findall("object")
        for k, c in enumerate(classes):
            flags = [o.findtext("difficult") for o in objs if o.findtext("name") == c]
            assert t[k] == (1 if "0" in flags else 0 if flags else -1)
    assert (targets == 0).sum() > 0  # the fixture does hold difficult-only classes


# -------------------------------------------------------------------------------------- model
def test_mapper_crops_to_a_fixed_size_and_keeps_the_label(tmp_path):
    write_image_folder(tmp_path / "f", 1)
    records = load_image_folder(str(tmp_path / "f"))
    opts = ["INPUT.CLASSIFICATION.TRAIN_CROP_SIZE", 40, "INPUT.CLASSIFICATION.TEST_RESIZE", 48,
            "INPUT.CLASSIFICATION.TEST_CROP_SIZE", 40]  # fmt: skip
    cfg = load_cfg(opts=opts)
    for is_train in (True, False):
        out = ClassificationDatasetMapper(cfg, is_train)(records[2])
        assert out["image"].shape == (3, 40, 40) and out["image"].dtype == torch.uint8
        assert out["label"] == records[2]["label"] == 2
    with pytest.raises(KeyError, match="label"):
        ClassificationDatasetMapper(cfg, False)({"file_name": records[0]["file_name"]})


def _train_steps(cfg, steps: int = 3):
    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    opt = build_classification_optimizer(cfg, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with EventStorage():
        for i in range(steps):
            losses = model(batch_of(8, seed=i))
            assert set(losses) == {"loss_cls"} and torch.isfinite(losses["loss_cls"])
            opt.zero_grad()
            losses["loss_cls"].backward()
            opt.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return model, opt, changed


def test_linear_probe_trains_only_the_classifier():
    model, opt, changed = _train_steps(load_cfg(SYN_CONFIGS[0], ["SOLVER.BASE_LR", 0.1]))
    assert changed == {"classifier.weight", "classifier.bias"}  # BN statistics included
    assert not model.backbone.training and model.training  # train() keeps the backbone in eval
    opt_params = {id(p) for g in opt.param_groups for p in g["params"]}
    assert opt_params == {id(model.classifier.weight), id(model.classifier.bias)}
    model.eval()
    out = model(batch_of(2))
    assert len(out) == 2 and out[0]["logits"].shape == (7,)


def test_finetuning_trains_the_backbone():
    model, _, changed = _train_steps(load_cfg(SYN_CONFIGS[1]))
    assert "backbone.stem.conv1.weight" in changed and "backbone.res5.1.conv2.weight" in changed
    assert "backbone.res2.0.conv1.norm.running_mean" in changed  # BN in train mode
    assert {"classifier.weight", "classifier.bias"} <= changed and model.backbone.training


def test_batch_of_mixed_sizes_is_refused():
    model = build_model(load_cfg()).eval()
    batch = batch_of(2)
    batch[1]["image"] = batch[1]["image"][:, :48]
    with pytest.raises(ValueError, match="share their size"):
        model(batch)


# ---------------------------------------------------------------------------------- evaluator
def test_evaluator_top1_top5_on_a_hand_made_case(tmp_path):
    name = f"hand_{uuid.uuid4().hex[:8]}"
    MetadataCatalog.get(name).thing_classes = [f"c{i}" for i in range(7)]
    # Class c has logit 10 - rank: order of scores per row.
    orders = [[3, 1, 0, 2, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0],
              [2, 3, 4, 5, 6, 0, 1]]  # fmt: skip
    labels = [3, 4, 0, 1]  # ranks 0, 4, 6, 6 -> top1 1/4, top5 2/4
    inputs, outputs = [], []
    for i, (order, label) in enumerate(zip(orders, labels)):
        logits = torch.zeros(7)
        logits[torch.tensor(order)] = torch.arange(7, 0, -1).float()
        inputs.append({"image_id": i, "label": label})
        outputs.append({"logits": logits})
    ev = ClassificationEvaluator(name, output_dir=str(tmp_path), distributed=False)
    ev.reset()
    ev.process(inputs[:3], outputs[:3])
    ev.process(inputs[3:], outputs[3:])
    res = ev.evaluate()
    assert res["classification"] == {"top1": 25.0, "top5": 50.0}
    saved = json.loads((tmp_path / RESULTS_FILE_NAME).read_text())
    assert saved["num_images"] == 4 and saved["top5"] == 50.0
    # With 3 classes top-5 would always be 100%: it is not reported.
    ev3 = ClassificationEvaluator(f"{name}_3", distributed=False)
    ev3.process([{"label": 2}], [{"logits": torch.tensor([0.0, 1.0, 2.0])}])
    assert ev3.evaluate()["classification"] == {"top1": 100.0}


def test_trainer_finetunes_from_converted_weights_and_evaluates(tmp_path):
    from virtex_d2.engine.trainer import Trainer

    class ClassificationTrainer(Trainer):  # the branch the lead's Trainer takes for us
        @classmethod
        def build_train_loader(cls, cfg):
            return build_classification_train_loader(cfg)

        @classmethod
        def build_test_loader(cls, cfg, dataset_name):
            return build_classification_test_loader(cfg, dataset_name)

        @classmethod
        def build_optimizer(cls, cfg, model):
            return build_classification_optimizer(cfg, model)

    tag = uuid.uuid4().hex[:8]
    train = write_image_folder(tmp_path / "train", 6)
    val = write_image_folder(tmp_path / "val", 2)
    register_image_folder(f"tr_{tag}", str(train))
    register_image_folder(f"va_{tag}", str(val), class_root=str(train))
    _, converted, state = r18_checkpoints(tmp_path, seed=3)
    cfg = load_cfg(SYN_CONFIGS[1], [
        "MODEL.WEIGHTS", str(converted), "MODEL.CLASSIFIER.NUM_CLASSES", 3,
        "DATASETS.TRAIN", (f"tr_{tag}",), "DATASETS.TEST", (f"va_{tag}",),
        "INPUT.CLASSIFICATION.TRAIN_CROP_SIZE", 48, "INPUT.CLASSIFICATION.TEST_RESIZE", 64,
        "INPUT.CLASSIFICATION.TEST_CROP_SIZE", 56, "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.IMS_PER_BATCH", 6, "SOLVER.MAX_ITER", 3, "SOLVER.STEPS", (2,),
        "TEST.CLASSIFICATION.IMS_PER_BATCH", 4, "OUTPUT_DIR", str(tmp_path / "out"),
    ])  # fmt: skip
    trainer = ClassificationTrainer(cfg)
    trainer.resume_or_load(resume=False)
    loaded = trainer.model.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if "num_batches" not in k)
    trainer.train()
    assert len(trainer.storage.history("total_loss").values()) == 3
    assert len(trainer.storage.history("cls_accuracy").values()) == 3
    assert not torch.equal(trainer.model.backbone.stem.conv1.weight, state["stem.conv1.weight"])
    results = trainer.test(cfg, trainer.model)
    assert set(results["classification"]) == {"top1"}  # 3 classes: no top-5
    assert 0.0 <= results["classification"]["top1"] <= 100.0
    out_dir = tmp_path / "out" / "inference" / f"va_{tag}"
    saved = json.loads((out_dir / RESULTS_FILE_NAME).read_text())
    assert saved["num_images"] == 6

    bad = cfg.clone()
    bad.MODEL.CLASSIFIER.NUM_CLASSES = 5
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_classification_train_loader(bad)


# ---------------------------------------------------------------------------------------- SVM
def test_svm_test_ap_ignores_difficult_only_images():
    rng = np.random.default_rng(0)
    pos, neg = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    train_t = np.array([1, -1] * 6)
    train_x = np.stack([pos if t == 1 else neg for t in train_t]) + rng.normal(0, 0.05, (12, 2))
    # The difficult-only test image looks the most positive of all; counted as a negative it
    # would rank first and cost AP.
    test_x = np.stack([pos * 2, pos, pos, neg, neg])
    test_t = np.array([[0], [1], [1], [-1], [-1]])
    res = run_svm_protocol(train_x, train_t[:, None], test_x, test_t, ["c"], SVMSettings())
    assert res["mAP"] == pytest.approx(100.0)
    assert res["per_class"][0]["num_test"] == 4 and res["chance_mAP"] == pytest.approx(50.0)
    # Two classes in two processes (the tool's default path) give the same answer.
    parallel = run_svm_protocol(train_x, np.tile(train_t[:, None], (1, 2)), test_x,
                                np.tile(test_t, (1, 2)), ["c", "d"], n_jobs=2)  # fmt: skip
    assert [r["ap"] for r in parallel["per_class"]] == pytest.approx([100.0, 100.0])
    counted = run_svm_protocol(train_x, train_t[:, None], test_x, np.where(test_t == 0, -1, test_t),
                               ["c"], SVMSettings())  # fmt: skip
    assert counted["mAP"] < 90.0
    with pytest.raises(ValueError, match="positive"):
        run_svm_protocol(train_x, -np.ones((12, 1), np.int8), test_x, test_t, ["c"])


def _load_tool():
    return load_tool("eval_voc07_svm")


def test_voc07_svm_tool_beats_chance_and_caches_features(tmp_path, monkeypatch):
    tool = _load_tool()
    voc = write_tiny_voc(tmp_path / "VOC2007")
    trainval, test = register_tiny_voc(voc)
    raw, converted, _ = r18_checkpoints(tmp_path)
    calls = []
    real_extract = features_mod.extract_features
    monkeypatch.setattr(
        features_mod, "extract_features", lambda *a, **k: calls.append(1) or real_extract(*a, **k)
    )

    def run(weights, source="d2", *opts):
        out = tmp_path / f"res_{len(calls)}_{uuid.uuid4().hex[:4]}.json"
        res = tool.main([
            "--config-file", str(SYN_CONFIGS[0]), "--dataset", f"{trainval},{test}",
            "--weights", str(weights), "--weights-source", source, "--json", str(out),
            "--cache-dir", str(tmp_path / "cache"), "--num-workers", "0", "--jobs", "1",
            "MODEL.DEVICE", "cpu", "TEST.VOC07_SVM.RESIZE", "64",
            "TEST.VOC07_SVM.CROP_SIZE", "64", *opts,
        ])  # fmt: skip
        assert json.loads(out.read_text())["mAP"] == pytest.approx(res["mAP"])
        return res

    first = run(converted)
    assert len(calls) == 2 and first["features_from_cache"] == {trainval: False, test: False}
    assert first["feature_dim"] == 512 and (first["num_train"], first["num_test"]) == (36, 24)
    # Random-init R-18 features already separate colours: every class beats its prior.
    for r in first["per_class"]:
        assert r["ap"] > r["chance"] + 15, r
    assert first["mAP"] > first["chance_mAP"] + 25

    second = run(converted, "d2", "TEST.VOC07_SVM.COSTS", "(0.1, 1.0)")  # other SVM grid
    assert len(calls) == 2, "features were re-extracted although cached"
    assert second["features_from_cache"] == {trainval: True, test: True}
    assert {r["cost"] for r in second["per_class"]} <= {0.1, 1.0}

    third = run(raw, "virtex_d2")  # the raw checkpoint (backbone.*) gives the same features
    assert len(calls) == 4 and third["mAP"] == pytest.approx(first["mAP"])
    run(converted, "d2", "TEST.VOC07_SVM.RESIZE_MODE", "shorter", "TEST.VOC07_SVM.CROP_SIZE", "56")
    assert len(calls) == 6  # other extractor settings: cache miss

    with pytest.raises(IncompleteBackboneError):
        run(converted, "torchvision")


def test_backbone_weights_of_another_depth_are_refused(tmp_path):
    _, converted, _ = r18_checkpoints(tmp_path)
    model = ImageClassifier(load_cfg(opts=["MODEL.RESNETS.DEPTH", 34]))
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH 18"):
        load_backbone_weights(model, str(converted), "d2")
