"""Checkpoint conversion between VirTex, torchvision and Detectron2 layouts."""
