"""Downstream detection configs: they merge, build, encode the paper's protocols, and the
synthetic ones train on CPU (SyncBN in one process, the extra-norm C4 head on VOC-format data)."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_pascal_voc
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.structures import Boxes, Instances, PolygonMasks
from detectron2.utils.events import EventStorage
from helpers import REPO, load_config
from PIL import Image
from torch import nn

from virtex_d2.checkpoint.convert import convert_checkpoint, save_d2_checkpoint
from virtex_d2.modeling.roi_heads import Res5ROIHeadsExtraNorm

DETECTION = sorted((REPO / "configs" / "detection").glob("*.yaml"))
SYNTHETIC = [
    REPO / "configs" / "synthetic" / n
    for n in (
        "mask_rcnn_R_18_FPN.yaml",
        "lvis_mask_rcnn_R_18_FPN.yaml",
        "voc_faster_rcnn_R_18_C4.yaml",
    )
]
LEAVES = [p for p in DETECTION if not p.name.startswith("Base-")]
IMAGENET_MEAN = [123.675, 116.28, 103.53]
IMAGENET_STD = [58.395, 57.12, 57.375]


# ------------------------------------------------------------------------------ merge and build
@pytest.mark.parametrize("path", DETECTION + SYNTHETIC, ids=lambda p: p.name)
def test_config_merges_builds_and_follows_the_common_protocol(path):
    cfg = load_config(path)
    model = build_model(cfg)  # R-50 models are only built, never run here
    assert cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.RESNETS.STRIDE_IN_1X1 is False
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == IMAGENET_MEAN
    assert list(cfg.MODEL.PIXEL_STD) == IMAGENET_STD
    assert cfg.TEST.PRECISE_BN.ENABLED
    if path.name == "lvis_mask_rcnn_R_50_FPN_2x_imagenet.yaml":
        # The reference's LVIS ImageNet baseline: frozen ImageNet BN statistics, no FPN norm.
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
        assert any(isinstance(m, FrozenBatchNorm2d) for m in model.backbone.bottom_up.modules())
        assert model.backbone.fpn_lateral2.norm is None
        return
    assert cfg.MODEL.RESNETS.NORM == "SyncBN"
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.backbone.modules())
    if "FPN" in path.name:
        assert cfg.MODEL.FPN.NORM == "SyncBN" and cfg.MODEL.MASK_ON
    else:
        assert isinstance(model.roi_heads, Res5ROIHeadsExtraNorm)
        assert isinstance(model.roi_heads.res5.norm, nn.SyncBatchNorm)
        assert not cfg.MODEL.MASK_ON


@pytest.mark.parametrize("path", LEAVES, ids=lambda p: p.name)
def test_leaf_sets_only_initialisation(path):
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= {"_BASE_", "MODEL", "OUTPUT_DIR"}
    allowed = {"WEIGHTS"}
    if path.name == "lvis_mask_rcnn_R_50_FPN_2x_imagenet.yaml":
        allowed |= {"RESNETS", "FPN"}  # the reference's FrozenBN baseline, see its comment
    assert set(raw.get("MODEL", {})) <= allowed
    cfg = load_config(path)
    init = path.stem.rsplit("_", 1)[1]
    expected = {
        "random": "",
        "imagenet": "output/torchvision_R_50_d2.pth",
        "virtex": "output/virtex_R_50_d2.pth",
    }[init]
    assert cfg.MODEL.WEIGHTS == expected
    if init != "random":  # the leaf says how to produce its weights
        assert "tools/convert_to_d2.py" in path.read_text()
    assert cfg.MODEL.RESNETS.DEPTH == 50


@pytest.mark.parametrize("path", SYNTHETIC, ids=lambda p: p.name)
def test_synthetic_num_classes_match_registered_dataset(path):
    cfg = load_config(path)
    name = cfg.DATASETS.TRAIN[0]
    if name not in DatasetCatalog.list():
        pytest.skip(f"{name} is not registered (yet)")
    classes = MetadataCatalog.get(name).get("thing_classes")
    assert classes is not None, f"{name} has no thing_classes metadata"
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == len(classes)


def _instances(h: int, w: int, n: int, g: torch.Generator, num_classes: int) -> Instances:
    inst = Instances((h, w))
    boxes, polys = [], []
    for _ in range(n):
        x0, y0 = (torch.rand(2, generator=g) * torch.tensor([w - 40, h - 40])).tolist()
        s = 20 + float(torch.rand(1, generator=g)) * 18
        boxes.append([x0, y0, x0 + s, y0 + s])
        polys.append([[x0, y0, x0 + s, y0, x0 + s / 2, y0 + s]])  # a triangle in the box
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.randint(0, num_classes, (n,), generator=g)
    inst.gt_masks = PolygonMasks(polys)
    return inst


def test_synthetic_mask_rcnn_trains_with_syncbn_on_cpu():
    # The LVIS variant differs only in class count and sampling; it is built above.
    cfg = load_config(REPO / "configs" / "synthetic" / "mask_rcnn_R_18_FPN.yaml")
    torch.manual_seed(0)
    model = build_model(cfg).train()
    g = torch.Generator().manual_seed(1)
    sizes = [(128, 160), (160, 128), (144, 144)]
    batch = []
    for i, (h, w) in enumerate(sizes):
        n = 0 if i == 2 else i + 2  # the last image has no instances
        image = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
        instances = _instances(h, w, n, g, cfg.MODEL.ROI_HEADS.NUM_CLASSES)
        batch.append({"image": image, "instances": instances})
    stem_norm = model.backbone.bottom_up.stem.conv1.norm
    fpn_norms = [
        m
        for n, m in model.backbone.named_modules()
        if n.startswith("fpn_") and isinstance(m, nn.SyncBatchNorm)
    ]
    assert isinstance(stem_norm, nn.SyncBatchNorm) and fpn_norms
    before = stem_norm.running_mean.clone()
    with EventStorage():
        losses = model(batch)
        total = sum(losses.values())
        total.backward()
    assert {"loss_cls", "loss_box_reg", "loss_mask", "loss_rpn_cls", "loss_rpn_loc"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert stem_norm.weight.grad is not None and stem_norm.weight.grad.abs().sum() > 0
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0  # FREEZE_AT 0
    assert all(m.weight.grad is not None for m in fpn_norms)
    assert not torch.equal(before, stem_norm.running_mean)  # trained with batch statistics


# ------------------------------------------------------------------------------ VOC C4 training
VOC_CLASSES = (
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)


def write_tiny_voc(root: Path, n: int = 4) -> Path:
    """VOC2007/{JPEGImages,Annotations,ImageSets/Main/trainval.txt} with n images of 1-2 boxes."""
    voc = root / "VOC2007"
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (voc / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    ids = []
    for i in range(n):
        fid = f"{i:06d}"
        ids.append(fid)
        h, w = (120, 160) if i % 2 else (160, 128)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ann = ET.Element("annotation")
        size = ET.SubElement(ann, "size")
        for tag, v in (("width", w), ("height", h), ("depth", 3)):
            ET.SubElement(size, tag).text = str(v)
        for j in range(1 + i % 2):
            x0, y0 = int(rng.integers(1, w - 60)), int(rng.integers(1, h - 60))
            x1, y1 = x0 + int(rng.integers(24, 56)), y0 + int(rng.integers(24, 56))
            img[y0:y1, x0:x1] = rng.integers(0, 256, 3, dtype=np.uint8)
            obj = ET.SubElement(ann, "object")
            ET.SubElement(obj, "name").text = VOC_CLASSES[(3 * i + j) % 20]
            ET.SubElement(obj, "difficult").text = "0"
            box = ET.SubElement(obj, "bndbox")
            for tag, v in (("xmin", x0), ("ymin", y0), ("xmax", x1), ("ymax", y1)):
                ET.SubElement(box, tag).text = str(v)
        Image.fromarray(img).save(voc / "JPEGImages" / f"{fid}.jpg", quality=90)
        ET.ElementTree(ann).write(voc / "Annotations" / f"{fid}.xml")
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("\n".join(ids) + "\n")
    return voc


def test_voc_c4_extra_norm_trains_two_iterations_from_converted_weights(tmp_path):
    from virtex_d2.engine import Trainer

    voc = write_tiny_voc(tmp_path / "data")
    name = f"voc_2007_tiny_{uuid.uuid4().hex[:8]}"
    register_pascal_voc(name, str(voc), "trainval", 2007, class_names=VOC_CLASSES)

    # Pretrained-like init: a Detectron2 R-18 in our meta-architecture's layout, converted.
    cfg_bb = get_cfg()
    cfg_bb.MODEL.RESNETS.DEPTH, cfg_bb.MODEL.RESNETS.RES2_OUT_CHANNELS = 18, 64
    cfg_bb.MODEL.RESNETS.OUT_FEATURES = ["res5"]
    wrapper = nn.Module()
    wrapper.backbone = build_resnet_backbone(cfg_bb, ShapeSpec(channels=3))
    src = tmp_path / "pretrained.pth"
    torch.save({"model": wrapper.state_dict()}, src)
    weights = tmp_path / "r18_d2.pth"
    save_d2_checkpoint(convert_checkpoint(str(src), "virtex_d2"), str(weights))

    cfg = load_config(REPO / "configs/synthetic/voc_faster_rcnn_R_18_C4.yaml")
    cfg.merge_from_list([
        "MODEL.WEIGHTS", str(weights), "MODEL.ROI_HEADS.NUM_CLASSES", 20,
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (),
        "DATALOADER.NUM_WORKERS", 0, "SOLVER.IMS_PER_BATCH", 2, "SOLVER.MAX_ITER", 2,
        "SOLVER.BASE_LR", 0.02, "SOLVER.WARMUP_ITERS", 1, "TEST.PRECISE_BN.NUM_ITER", 1,
        "OUTPUT_DIR", str(tmp_path / "out"),
    ])  # fmt: skip
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    model = trainer.model
    roi = model.roi_heads
    assert isinstance(roi, Res5ROIHeadsExtraNorm)
    loaded = roi.res5[0].conv1.weight.detach().clone()
    assert torch.equal(loaded, wrapper.backbone.res5[0].conv1.weight)  # res5 came from the file
    norm_weight = roi.res5.norm.weight.detach().clone()
    trainer.train()

    losses = trainer.storage.history("total_loss").values()
    assert len(losses) == 2 and all(np.isfinite(v) for v, _ in losses)
    # The extra norm sits in the forward path: its statistics and affine weight moved.
    assert not torch.equal(roi.res5.norm.running_mean, torch.zeros_like(roi.res5.norm.running_mean))
    assert not torch.equal(roi.res5.norm.weight, norm_weight)
    assert not torch.equal(roi.res5[0].conv1.weight, loaded)
    assert (tmp_path / "out" / "model_final.pth").is_file()
    DatasetCatalog.remove(name)
