"""Config keys of virtex-d2 (placeholder, filled by the pretraining issue)."""
from detectron2.config import CfgNode as CN


def add_virtex_config(cfg: CN) -> None:
    """Add every VirTex key to a Detectron2 config, in place."""
    cfg.MODEL.VIRTEX = CN()
