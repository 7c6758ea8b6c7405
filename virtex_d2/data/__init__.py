"""Datasets, tokenizer, augmentations and dataset mappers."""
from . import datasets  # noqa: F401  (registers datasets in DatasetCatalog/MetadataCatalog)
