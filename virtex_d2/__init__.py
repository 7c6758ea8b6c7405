"""VirTex as a Detectron2 extension."""
__version__ = "0.1.0"
