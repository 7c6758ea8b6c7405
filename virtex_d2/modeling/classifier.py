"""``ImageClassifier``: a Detectron2 backbone, global average pooling and one linear layer.

The backbone attribute is called ``backbone`` so that converted backbone checkpoints (names like
``res2.0.conv1.weight``) load through ``DetectionCheckpointer``'s suffix matching, exactly as for
the detectors. With ``freeze_backbone`` (linear probe) the backbone has no gradient, runs under
``torch.no_grad`` and stays in eval mode whatever ``train()`` is called with, so BatchNorm keeps
its pretrained statistics. The reference linear probe is plain (no extra BN before the linear
layer), and so is this one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = ["ImageClassifier"]


@META_ARCH_REGISTRY.register()
class ImageClassifier(nn.Module):
    """Single-label image classifier for linear probing and fine-tuning.

    Input: ``list[dict]``, each with ``"image"``: uint8/float tensor (3, H, W) in the model's
    input format and, for training, ``"label"``: int. All images of a batch must share H, W.
    Training returns ``{"loss_cls": scalar}``; inference returns one
    ``{"logits": (num_classes,) tensor}`` per image.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        in_feature: str = "res5",
        freeze_backbone: bool = False,
        init_std: float = 0.01,
    ):
        super().__init__()
        shapes = backbone.output_shape()
        if in_feature not in shapes:
            raise ValueError(
                f"backbone outputs {sorted(shapes)}, not {in_feature!r}; add it to "
                "MODEL.RESNETS.OUT_FEATURES or change MODEL.CLASSIFIER.IN_FEATURE"
            )
        self.backbone = backbone
        self.in_feature = in_feature
        self.freeze_backbone = freeze_backbone
        self.feature_dim = shapes[in_feature].channels
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        nn.init.normal_(self.classifier.weight, mean=0.0, std=init_std)
        nn.init.zeros_(self.classifier.bias)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        if freeze_backbone:
            for p in self.backbone.parameters():
                p.requires_grad_(False)
            self.backbone.eval()

    @classmethod
    def from_config(cls, cfg) -> dict[str, Any]:
        c = cfg.MODEL.CLASSIFIER
        return {
            "backbone": build_backbone(cfg),
            "num_classes": c.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "in_feature": c.IN_FEATURE,
            "freeze_backbone": c.FREEZE_BACKBONE,
            "init_std": c.INIT_STD,
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.freeze_backbone:
            # Frozen BN must use (and keep) its running statistics during training too.
            self.backbone.eval()
        return self

    def preprocess_image(self, batched_inputs: list[dict[str, Any]]) -> torch.Tensor:
        """Normalised images, shape (B, 3, H, W)."""
        images = [x["image"] for x in batched_inputs]
        sizes = {tuple(im.shape[-2:]) for im in images}
        if len(sizes) != 1:
            # Padding would leak zeros into the average pool; crops make sizes equal.
            raise ValueError(f"images of one batch must share their size, got {sorted(sizes)}")
        x = torch.stack([im.to(self.device) for im in images]).float()
        return (x - self.pixel_mean) / self.pixel_std

    def pooled_features(self, batched_inputs: list[dict[str, Any]]) -> torch.Tensor:
        """Globally average-pooled ``in_feature`` map, shape (B, C) (C = 2048 for res5 of an
        R-50)."""
        images = self.preprocess_image(batched_inputs)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            # shape: (B, C, h, w)
            fmap = self.backbone(images)[self.in_feature]
        # shape: (B, C)
        return fmap.mean(dim=(2, 3))

    def forward(self, batched_inputs: list[dict[str, Any]]):
        features = self.pooled_features(batched_inputs)
        # shape: (B, num_classes)
        logits = self.classifier(features)
        if not self.training:
            return [{"logits": row} for row in logits]
        if any("label" not in x for x in batched_inputs):
            raise KeyError("training inputs need a 'label' (class index) per image")
        labels = torch.as_tensor([int(x["label"]) for x in batched_inputs], device=self.device)
        loss = F.cross_entropy(logits, labels)
        with torch.no_grad():
            accuracy = (logits.argmax(dim=1) == labels).float().mean()
        get_event_storage().put_scalar("cls_accuracy", float(accuracy))
        return {"loss_cls": loss}
