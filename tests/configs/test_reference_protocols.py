"""Protocols run as the reference implementation runs them (what the mappers, models and
schedulers do, read from the shipped configs)."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock
from helpers import REPO, learning_rates, load_config
from torch import nn

from virtex_d2.data.classification_mapper import (
    build_classification_augmentations,
    build_eval_augmentations,
)
from virtex_d2.data.train_loader import drop_unlabelled_for_multilabel
from virtex_d2.data.transforms import LinearResizeTransform, RandomResizedCrop, resize_transform
from virtex_d2.solver import build_lr_scheduler

CONFIGS = REPO / "configs"


def _apply(augs, image):
    from detectron2.data import transforms as T

    inp = T.AugInput(image)
    T.AugmentationList(augs)(inp)
    return inp.image


def test_voc07_svm_features_see_a_centre_crop_not_a_squashed_image():
    """Shorter side 256 then the central 224: a band at the far left of a wide image is cut
    away (squashing to 224 x 224 would keep it)."""
    svm = load_config("classification/voc07_svm_R_50_virtex.yaml").TEST.VOC07_SVM
    image = np.full((300, 600, 3), 128, np.uint8)
    image[:, :100] = (255, 0, 0)
    out = _apply(build_eval_augmentations(svm.RESIZE_MODE, svm.RESIZE, svm.CROP_SIZE), image)
    assert out.shape == (224, 224, 3)
    assert not (out[..., 0] > 200).any()
    squashed = _apply(build_eval_augmentations("global", 224, 224), image)
    assert (squashed[:, :30, 0] > 200).all()


def _crop_fractions(augs, image, n=400):
    fractions = []
    for _ in range(n):
        t = augs[0].get_transform(image)
        crop = t.transforms[0]
        fractions.append(crop.w * crop.h / (image.shape[0] * image.shape[1]))
    return np.array(fractions)


@pytest.mark.parametrize(
    "config",
    [
        "classification/imagenet_linear_R_50_virtex.yaml",
        "classification/inat18_finetune_R_50_virtex.yaml",
    ],
)
def test_downstream_crops_sample_scale_from_0_08(config):
    random.seed(0)  # the crop box draws from Python's random
    augs = build_classification_augmentations(load_config(config), is_train=True)
    frac = _crop_fractions(augs, np.zeros((400, 400, 3), np.uint8))
    assert frac.min() >= 0.08 - 0.01 and (frac < 0.2).mean() > 0.05


def test_random_resized_crop_scale_and_ratio_distribution():
    """Crop area fractions and aspect ratios are distributed as torchvision's
    RandomResizedCrop samples them (its sampler is the oracle), on a non-square image."""
    import torchvision.transforms as TV
    from PIL import Image

    random.seed(1)  # ours draws from Python's random, torchvision's from torch
    torch.manual_seed(1)
    h, w = 600, 900
    aug = RandomResizedCrop(64, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    image = np.zeros((h, w, 3), np.uint8)
    ours, theirs = [], []
    for _ in range(3000):
        crop = aug.get_transform(image).transforms[0]
        ours.append((crop.w * crop.h / (h * w), math.log(crop.w / crop.h)))
        _, _, ch, cw = TV.RandomResizedCrop.get_params(
            Image.new("RGB", (w, h)), [0.2, 1.0], [3 / 4, 4 / 3]
        )
        theirs.append((cw * ch / (h * w), math.log(cw / ch)))
    ours, theirs = np.array(ours), np.array(theirs)
    assert 0.19 < ours[:, 0].min() and ours[:, 0].max() <= 1.0
    assert np.abs(ours[:, 1]).max() <= math.log(4 / 3) + 0.01
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(ours[:, 0], q) - np.quantile(theirs[:, 0], q)) < 0.03, q
        assert abs(np.quantile(ours[:, 1], q) - np.quantile(theirs[:, 1], q)) < 0.03, q


def _residual_last_norms(module: nn.Module):
    for m in module.modules():
        if isinstance(m, BottleneckBlock):
            yield m.conv3.norm
        elif isinstance(m, BasicBlock):
            yield m.conv2.norm


@pytest.mark.parametrize(
    "config,where",
    [
        ("detection/coco_mask_rcnn_R_50_FPN_2x_random.yaml", "backbone.bottom_up"),
        ("detection/voc_faster_rcnn_R_50_C4_24k_random.yaml", "backbone"),
        ("detection/voc_faster_rcnn_R_50_C4_24k_random.yaml", "roi_heads.res5"),
        ("classification/voc07_svm_R_50_random.yaml", "backbone"),
    ],
)
def test_random_init_baselines_zero_the_last_bn_of_each_residual_branch(config, where):
    model = build_model(load_config(config))
    module = model.get_submodule(where)
    norms = list(_residual_last_norms(module))
    assert len(norms) >= 3
    assert all(float(n.weight.detach().abs().sum()) == 0 for n in norms)
    # ... and only those: the other norms start at 1.
    other = [
        m
        for m in module.modules()
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)) and all(m is not n for n in norms)
    ]
    assert other and all(float(m.weight.detach().min()) == 1.0 for m in other)


def test_lvis_imagenet_baseline_freezes_bn_and_drops_the_fpn_norm():
    model = build_model(load_config("detection/lvis_mask_rcnn_R_50_FPN_2x_imagenet.yaml"))
    norms = [
        m
        for m in model.backbone.bottom_up.modules()
        if isinstance(m, nn.Module) and "norm" in type(m).__name__.lower()
    ]
    assert norms and all(isinstance(m, FrozenBatchNorm2d) for m in norms)
    assert model.backbone.fpn_lateral2.norm is None and model.backbone.fpn_output5.norm is None
    virtex = build_model(load_config("detection/lvis_mask_rcnn_R_50_FPN_2x_virtex.yaml"))
    assert isinstance(virtex.backbone.fpn_lateral2.norm, nn.SyncBatchNorm)


@pytest.mark.parametrize(
    "config",
    ["pretrain/bicaptioning_R_101_L1_H1024.yaml", "pretrain/bicaptioning_R_50W2X_L1_H1024.yaml"],
)
def test_backbone_ablation_models_use_the_base_textual_head(config):
    from unittest import mock

    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(load_config(config))
    head = model.textual_head
    assert head.hidden_size == 1024 and len(head.transformer.layers) == 1
    assert head.transformer.layers[0].linear1.out_features == 4096


def test_multilabel_pretraining_drops_images_without_instances():
    records = [
        {"file_name": f"{i}.jpg", "labels": labels}
        for i, labels in enumerate([[1], [], [2, 3], []])
    ]
    cfg = load_config("synthetic/multilabel_classification_R_18.yaml")
    assert [r["file_name"] for r in drop_unlabelled_for_multilabel(cfg, records)] == [
        "0.jpg",
        "2.jpg",
    ]
    captioning = load_config("synthetic/bicaptioning_R_18.yaml")
    assert drop_unlabelled_for_multilabel(captioning, records) == records


def test_cosine_decay_is_counted_after_warmup():
    """Reference schedule: linear warm-up to the peak, then a cosine over the remaining steps
    (Detectron2's WarmupCosineLR would already have decayed by the end of warm-up)."""
    cfg = load_config(
        "pretrain/bicaptioning_R_50_L1_H1024.yaml",
        "SOLVER.MAX_ITER",
        "110",
        "SOLVER.WARMUP_ITERS",
        "10",
        "SOLVER.BASE_LR",
        "1.0",
    )
    lrs = learning_rates(cfg, 110)
    assert lrs[5] == pytest.approx(0.5)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.5, abs=1e-6)  # half-way through the cosine
    assert lrs[109] < 0.001


def test_schedule_that_never_leaves_warmup_is_refused():
    cfg = load_config("synthetic/bicaptioning_R_18.yaml", "SOLVER.MAX_ITER", "30")
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="SOLVER.WARMUP_ITERS"):
        build_lr_scheduler(cfg, opt)


def test_opencv_style_resize_does_not_antialias():
    """Halving with half-pixel centres averages 2x2 blocks; shrinking 8x samples between two
    pixels (no antialiasing), where Pillow's bilinear widens its filter and blurs."""
    rng = np.random.RandomState(0)
    image = rng.randint(0, 256, (16, 16, 3)).astype(np.uint8)
    half = LinearResizeTransform(16, 16, 8, 8).apply_image(image)
    blocks = image.reshape(8, 2, 8, 2, 3).astype(float).mean(axis=(1, 3))
    assert np.abs(half.astype(float) - blocks).max() <= 0.5
    # Columns 3 and 4 of every 8 are white: shrinking 8x samples exactly between them.
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, 3::8] = stripes[:, 4::8] = 255
    sharp = resize_transform(64, 64, 8, 8, antialias=False).apply_image(stripes)
    smooth = resize_transform(64, 64, 8, 8, antialias=True).apply_image(stripes)
    assert (sharp == 255).all()
    assert 40 < float(smooth.mean()) < 110  # the white quarter averaged with the black


def test_imported_reference_resize_is_used_by_the_caption_mapper():
    from virtex_d2.data.caption_mapper import build_caption_augmentations

    cfg = load_config("synthetic/bicaptioning_R_18.yaml", "INPUT.VIRTEX.RESIZE_ANTIALIAS", "False")
    train = build_caption_augmentations(cfg, True)[0].get_transform(
        np.zeros((300, 400, 3), np.uint8)
    )
    assert isinstance(train.transforms[1], LinearResizeTransform)
    test = build_caption_augmentations(cfg, False)[0].get_transform(
        np.zeros((300, 400, 3), np.uint8)
    )
    assert isinstance(test, LinearResizeTransform) and (test.new_h, test.new_w) == (128, 171)
