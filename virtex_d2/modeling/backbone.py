"""Visual backbone for pretraining: Detectron2's ResNet, optionally zero-initialising the last
norm of every residual branch (torchvision's ``zero_init_residual``, used by reference VirTex).

Because it *is* Detectron2's ResNet (same module names), pretrained weights load into
Detectron2's R-FPN and R-C4 models with at most a prefix change.
"""
from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BottleneckBlock, build_resnet_backbone
from torch import nn


def zero_init_residual_norms(backbone: nn.Module) -> int:
    """Set weight=0 on the norm closing each residual branch; returns how many were set."""
    count = 0
    for m in backbone.modules():
        last = None
        if isinstance(m, BottleneckBlock):
            last = m.conv3.norm
        elif isinstance(m, BasicBlock):
            last = m.conv2.norm
        if last is not None and getattr(last, "weight", None) is not None:
            nn.init.zeros_(last.weight)
            count += 1
    return count


@BACKBONE_REGISTRY.register()
def build_virtex_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``build_resnet_backbone`` plus ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``."""
    backbone = build_resnet_backbone(cfg, input_shape)
    if cfg.MODEL.RESNETS.ZERO_INIT_RESIDUAL:
        n = zero_init_residual_norms(backbone)
        if n == 0:
            raise ValueError(
                "MODEL.RESNETS.ZERO_INIT_RESIDUAL is set but no residual norm has a weight "
                f"(MODEL.RESNETS.NORM={cfg.MODEL.RESNETS.NORM!r}); use a trainable norm (BN/SyncBN)"
            )
    return backbone
