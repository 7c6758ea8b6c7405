"""``import_reference``: a reference VirTex checkpoint + its config + its SentencePiece vocabulary
become a virtex-d2 model directory that every tool accepts.

Output directory:

- ``config.yaml``: a complete virtex-d2 config (every key; ``MODEL.WEIGHTS`` names the weights
  and ``MODEL.VIRTEX.TOKENIZER`` the vocabulary, both as absolute paths);
- ``model_final.pth``: ``{"model": state_dict}`` in our names, tensors only
  (``torch.load(weights_only=True)`` reads it);
- ``vocab.json``: the vocabulary in our tokenizer's format (same ids as the SentencePiece model).

The translation of config keys and weight names lives in :mod:`virtex_d2.checkpoint.reference`;
this module adds what needs the model: building it from the translated config and loading the
weights strictly, so a checkpoint that does not fit its config stops here with the keys named.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import build_model

from ..checkpoint.reference import (
    ReferenceImportError,
    ensure_dir,
    load_reference_weights,
    read_reference_checkpoint,
    read_reference_config,
    reference_backbone_overrides,
    rename_state_dict,
    translate_config,
)
from ..config import CAPTIONING_TASKS, add_virtex_config
from ..data.spm_vocabulary import import_sentencepiece_vocabulary
from ..io import atomic_write, atomic_write_text

logger = logging.getLogger(__name__)

# What configs/pretrain/Base-VirTex.yaml sets, for a config that must stand alone (the package
# may be installed without the repository's configs/).
_BASE = {
    "MODEL.META_ARCHITECTURE": "VirTex",
    "MODEL.BACKBONE.NAME": "build_virtex_resnet_backbone",
    "MODEL.BACKBONE.FREEZE_AT": 0,
    "MODEL.RESNETS.OUT_FEATURES": ["res5"],
    "MODEL.RESNETS.NORM": "BN",
    "MODEL.PIXEL_MEAN": [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD": [58.395, 57.12, 57.375],
    "MODEL.DEVICE": "cpu",
    "INPUT.FORMAT": "RGB",
    # The reference resizes with OpenCV's INTER_LINEAR, which does not antialias.
    "INPUT.VIRTEX.RESIZE_ANTIALIAS": False,
    "DATASETS.TRAIN": ("coco_captions_2017_train",),
    "DATASETS.TEST": ("coco_captions_2017_val",),
    "DATALOADER.ASPECT_RATIO_GROUPING": False,
    "DATALOADER.FILTER_EMPTY_ANNOTATIONS": False,
    "SOLVER.WARMUP_FACTOR": 0.0,
    "SOLVER.WARMUP_METHOD": "linear",
    "SOLVER.CHECKPOINT_PERIOD": 10000,
}


@dataclass
class ImportResult:
    """Paths written by :func:`import_reference` and notes on keys without an effect."""

    config: str
    weights: str
    vocabulary: str | None
    task: str
    notes: list[str]


def _set(cfg: CfgNode, key: str, value: Any) -> None:
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    if leaf not in node:
        raise KeyError(f"{key} is not a virtex-d2 config key")
    old = node[leaf]
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    node[leaf] = value


def _vocab_from_config(config: str) -> str | None:
    """The config's ``DATA.TOKENIZER_MODEL``, as given or relative to the config's folder."""
    name = read_reference_config(config).get("DATA", {}).get("TOKENIZER_MODEL")
    if not name:
        return None
    for candidate in (name, os.path.join(os.path.dirname(os.path.abspath(config)), name)):
        if os.path.isfile(candidate):
            return candidate
    return None


def import_reference(
    checkpoint: str, config: str, vocab: str | None, output: str, device: str = "cpu"
) -> ImportResult:
    """Import a reference checkpoint; see the module docstring. ``vocab`` (the SentencePiece
    ``.model``) is needed for the tasks with a textual head; by default the config's
    ``DATA.TOKENIZER_MODEL``, as given or next to the config.

    Raises:
        ReferenceImportError: unknown config keys, values we cannot express, checkpoint keys
            that do not fit, vocabulary problems (each message names the key or file).
    """
    translation = translate_config(read_reference_config(config))
    values = translation.values
    task = values["MODEL.VIRTEX.TASK"]
    state = read_reference_checkpoint(checkpoint)
    feature_size = (
        read_reference_config(config).get("MODEL", {}).get("VISUAL", {}).get("FEATURE_SIZE")
    )
    cfg = get_cfg()
    add_virtex_config(cfg)
    for key, value in {
        **_BASE,
        **values,
        **reference_backbone_overrides(state, feature_size),
    }.items():
        _set(cfg, key, value)
    cfg.MODEL.DEVICE = device
    output = ensure_dir(os.path.abspath(output))
    vocab_path = None
    if task in (*CAPTIONING_TASKS, "masked_lm"):
        vocab = vocab or _vocab_from_config(config)
        if not vocab:
            raise ReferenceImportError(
                f"a {task} model needs its vocabulary: pass --vocab FILE.model (the config's "
                "DATA.TOKENIZER_MODEL was not found as given nor next to the config)"
            )
        vocab_path = os.path.join(output, "vocab.json")
        tokenizer = import_sentencepiece_vocabulary(vocab, vocab_path)
        if len(tokenizer) != cfg.MODEL.VIRTEX.VOCAB_SIZE:
            raise ReferenceImportError(
                f"DATA.VOCAB_SIZE is {cfg.MODEL.VIRTEX.VOCAB_SIZE} but {vocab} has "
                f"{len(tokenizer)} pieces"
            )
        cfg.MODEL.VIRTEX.TOKENIZER = vocab_path
    elif task == "multilabel_classification":
        # The reference's layer has one output per COCO category plus a reserved index 0.
        cfg.MODEL.VIRTEX.NUM_MULTILABEL_CLASSES = int(state["textual.output.weight"].shape[0]) - 1
    renamed = rename_state_dict(state, task)
    model = build_model(cfg)
    load_reference_weights(model, renamed)
    weights_path = os.path.join(output, "model_final.pth")
    payload = {
        "model": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
        "__author__": "virtex_d2 import_reference",
        "iteration": 0,
    }
    atomic_write(weights_path, lambda f: torch.save(payload, f))
    cfg.MODEL.WEIGHTS = weights_path
    config_path = os.path.join(output, "config.yaml")
    text = cfg.dump()
    atomic_write_text(config_path, text)
    for note in translation.notes:
        logger.info("import_reference: %s", note)
    return ImportResult(config_path, weights_path, vocab_path, task, translation.notes)
