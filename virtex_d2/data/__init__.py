"""Datasets, tokenizer, augmentations and dataset mappers."""

from __future__ import annotations

from . import datasets  # noqa: F401  (registers datasets in DatasetCatalog/MetadataCatalog)
