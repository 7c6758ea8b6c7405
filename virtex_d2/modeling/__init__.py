"""Meta-architectures, backbones and textual heads (registered on import)."""

from __future__ import annotations

from . import (
    backbone,  # noqa: F401  (registers build_virtex_resnet_backbone)
    roi_heads,  # noqa: F401  (registers Res5ROIHeadsExtraNorm)
)
from .classifier import ImageClassifier  # noqa: F401  (registers the ImageClassifier)
from .meta_arch import VirTex  # noqa: F401  (registers the VirTex meta-architecture)
from .textual_head import TEXTUAL_HEAD_REGISTRY, build_textual_head  # noqa: F401
