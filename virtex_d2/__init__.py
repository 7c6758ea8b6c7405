"""VirTex (Desai & Johnson, CVPR 2021) as a Detectron2 extension.

Importing this package registers everything it provides with Detectron2's registries and
catalogs: datasets (captioning, detection, classification), the VirTex and ImageClassifier
meta-architectures, textual heads, ROI heads and evaluators.
"""

from __future__ import annotations

from . import (
    data,  # noqa: F401  (registers datasets)
    evaluation,  # noqa: F401
    modeling,  # noqa: F401  (registers meta-architectures, heads)
)
from .config import add_virtex_config  # noqa: F401

__version__ = "0.1.0"
