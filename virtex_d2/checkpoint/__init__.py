"""Checkpoint conversion between VirTex, torchvision and Detectron2 layouts."""

from __future__ import annotations

from .convert import (  # noqa: F401
    SOURCES,
    ConversionResult,
    IncompleteBackboneError,
    convert_checkpoint,
    convert_state_dict,
    load_any_checkpoint,
    save_d2_checkpoint,
)
