"""VirTex (Desai & Johnson, CVPR 2021) as a Detectron2 extension.

Importing this package registers everything it provides with Detectron2's registries and
catalogs: datasets, the VirTex meta-architectures, textual heads, ROI heads and evaluators.
"""
from . import classification  # noqa: F401  (registers ImageClassifier, classification data)
from . import data  # noqa: F401  (registers datasets)
from . import evaluation  # noqa: F401
from . import modeling  # noqa: F401  (registers meta-architectures, heads)
from .config import add_virtex_config  # noqa: F401

__version__ = "0.1.0"
