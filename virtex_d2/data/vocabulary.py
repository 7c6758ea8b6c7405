"""Finds (and for the synthetic data, builds) the tokenizer a config points at."""

from __future__ import annotations

import logging
from pathlib import Path

from detectron2.data import MetadataCatalog

from .datasets.synthetic import GENERATOR_VERSION, ensure_synthetic_dataset
from .tokenizer import CaptionTokenizer, train_vocabulary

logger = logging.getLogger("virtex_d2")

SYNTHETIC_SCHEME = "synthetic://"


def synthetic_root() -> Path:
    """Where the registered synthetic datasets live (``$DETECTRON2_DATASETS/synthetic`` at
    registration time)."""
    json_file = MetadataCatalog.get("synthetic_captions_train").json_file
    return Path(json_file).parent.parent


def synthetic_vocabulary_path(vocab_size: int) -> Path:
    # Versioned like the data, so a regenerated dataset never meets a stale vocabulary.
    return synthetic_root() / f"vocab_v{GENERATOR_VERSION}_{vocab_size}.json"


def ensure_synthetic_vocabulary(vocab_size: int) -> Path:
    """Build the synthetic captions' vocabulary on first use (and the data, if missing)."""
    path = synthetic_vocabulary_path(vocab_size)
    if path.is_file():
        return path
    root = Path(ensure_synthetic_dataset(str(synthetic_root())))
    logger.info(f"Building the synthetic captions vocabulary ({vocab_size} tokens) at {path}")
    train_vocabulary([root / "annotations" / "captions_train.json"], vocab_size, path)
    return path


def resolve_tokenizer(cfg) -> CaptionTokenizer:
    """The tokenizer of ``cfg.MODEL.VIRTEX.TOKENIZER``; checks it agrees with VOCAB_SIZE."""
    name = cfg.MODEL.VIRTEX.TOKENIZER
    size = cfg.MODEL.VIRTEX.VOCAB_SIZE
    if name.startswith(SYNTHETIC_SCHEME):
        path = ensure_synthetic_vocabulary(size)
    else:
        path = Path(name)
    tok = CaptionTokenizer(path)
    if tok.get_vocab_size() != size:
        raise ValueError(
            f"MODEL.VIRTEX.VOCAB_SIZE is {size} but the tokenizer {path} has "
            f"{tok.get_vocab_size()} tokens; set MODEL.VIRTEX.VOCAB_SIZE {tok.get_vocab_size()} "
            "or rebuild the vocabulary with tools/build_vocabulary.py --vocab-size "
            f"{size}"
        )
    return tok
