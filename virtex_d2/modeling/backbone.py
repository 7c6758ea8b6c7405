"""Detectron2's ResNet (plain and with FPN), optionally zero-initialising the last norm of every
residual branch (torchvision's ``zero_init_residual``), per ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``.

The reference implementation starts every ResNet that way: its pretraining backbone and its
"random init" baselines downstream (a torchvision ResNet built with ``zero_init_residual=True``,
converted like any other checkpoint). With pretrained weights the initialisation is overwritten,
so the builders below serve random, ImageNet and VirTex initialisations alike.

Because these *are* Detectron2's ResNets (same module names), pretrained weights load into
Detectron2's R-FPN and R-C4 models with at most a prefix change.
"""

from __future__ import annotations

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, Backbone
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
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


def apply_zero_init_residual(cfg, module: nn.Module) -> None:
    """Zero the residual branches' last norms of ``module`` if ``ZERO_INIT_RESIDUAL`` is set."""
    if not cfg.MODEL.RESNETS.get("ZERO_INIT_RESIDUAL", False):
        return
    if zero_init_residual_norms(module) == 0:
        raise ValueError(
            "MODEL.RESNETS.ZERO_INIT_RESIDUAL is set but no residual norm has a weight "
            f"(MODEL.RESNETS.NORM={cfg.MODEL.RESNETS.NORM!r}); use a norm with weights "
            "(BN/SyncBN/FrozenBN/GN)"
        )


@BACKBONE_REGISTRY.register()
def build_virtex_resnet_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``build_resnet_backbone`` plus ``MODEL.RESNETS.ZERO_INIT_RESIDUAL``."""
    backbone = build_resnet_backbone(cfg, input_shape)
    apply_zero_init_residual(cfg, backbone)
    return backbone


@BACKBONE_REGISTRY.register()
def build_virtex_resnet_fpn_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """``build_resnet_fpn_backbone`` plus ``MODEL.RESNETS.ZERO_INIT_RESIDUAL`` (the ResNet
    inside the FPN is initialised like the reference's random-init baseline)."""
    backbone = build_resnet_fpn_backbone(cfg, input_shape)
    apply_zero_init_residual(cfg, backbone.bottom_up)
    return backbone
