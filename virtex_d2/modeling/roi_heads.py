"""C4 ROI heads with an extra normalisation layer after res5 (VirTex's PASCAL VOC protocol).

When the backbone is fine-tuned with BatchNorm, the box predictor of a C4 model receives res5
features that were never normalised after the last residual addition; the VirTex paper (after
MoCo) appends one more norm layer there for its VOC07+12 Faster R-CNN R50-C4 runs.
"""

from __future__ import annotations

from typing import Any

from detectron2.layers import ShapeSpec, get_norm
from detectron2.modeling import ROI_HEADS_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, ResNet
from detectron2.modeling.roi_heads import Res5ROIHeads
from torch import nn

from .backbone import apply_zero_init_residual

__all__ = ["Res5ROIHeadsExtraNorm"]

# Residual blocks in res5 of the BasicBlock ResNets (Detectron2's table in build_resnet_backbone).
_BASIC_RES5_BLOCKS = {18: 2, 34: 3}


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """``Res5ROIHeads`` whose res5 block ends with ``get_norm(MODEL.RESNETS.NORM, C)``.

    The norm is the child ``res5.norm`` (after ``res5.0`` .. ``res5.{n-1}``), so converted
    backbone checkpoints (``res5.{i}.*``) still match ``roi_heads.res5.{i}.*`` and the new layer
    keeps its default initialisation (identity for BN).

    Unlike Detectron2's ``Res5ROIHeads`` (which always builds bottleneck blocks), ResNet-18/34
    configs get a res5 of BasicBlocks, so C4 models of those depths accept their own pretrained
    res5 weights. Pooled features are (R, C_res4, P, P); res5 output (R, C, P/2, P/2) with
    C = 8 * MODEL.RESNETS.RES2_OUT_CHANNELS, normalised per channel.
    """

    @classmethod
    def from_config(cls, cfg, input_shape: dict[str, ShapeSpec]) -> dict[str, Any]:
        # Extending the built kwargs keeps to the public @configurable contract instead of
        # overriding the private _build_res5_block hook.
        ret = super().from_config(cfg, input_shape)
        norm = cfg.MODEL.RESNETS.NORM
        out_channels = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS * 8  # res5 is 8x res2
        depth = cfg.MODEL.RESNETS.DEPTH
        if depth in _BASIC_RES5_BLOCKS:
            num_blocks = _BASIC_RES5_BLOCKS[depth]
            res5 = nn.Sequential(
                *ResNet.make_stage(
                    BasicBlock,
                    num_blocks,
                    stride_per_block=[2] + [1] * (num_blocks - 1),
                    in_channels=out_channels // 2,
                    out_channels=out_channels,
                    norm=norm,
                )
            )
        else:
            res5 = ret["res5"]
            if isinstance(res5, (list, tuple)):
                res5 = nn.Sequential(*res5)
        # The res5 blocks live here in C4 models: initialise them like the backbone's.
        apply_zero_init_residual(cfg, res5)
        res5.add_module("norm", get_norm(norm, out_channels))
        ret["res5"] = res5
        return ret
