"""Import a checkpoint of the reference VirTex implementation (kdexd/virtex) as a virtex-d2 model.

A reference checkpoint holds ``{"model": state_dict, ...}`` of one of its five pretraining models
(torchvision ResNet under ``visual.cnn.``, a transformer textual head under ``textual.`` and, for
bicaptioning, ``backward_textual.``), and is described by a config in the reference's own format
(``MODEL.TEXTUAL.NAME: transdec_postnorm::L1_H2048_A32_F8192`` and so on). This module

- translates that config key by key into virtex-d2 config values (:func:`translate_config`):
  every key is either mapped, checked against what we support, or explicitly irrelevant to an
  imported model; an unknown key or a value we cannot express raises
  :class:`ReferenceImportError` naming the key;
- renames the weights to our model's names (:func:`rename_state_dict`), checking that the
  tensors the reference ties (projection, embedding, output layer shared by both directions)
  really are equal, and that nothing is left over;
- builds our model, loads the renamed weights strictly (a missing or wrongly shaped tensor is an
  error naming it) and writes ``config.yaml``, ``model_final.pth`` (tensors only) and the
  vocabulary (:func:`import_reference`).
"""

from __future__ import annotations

import logging
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml

from .convert import (
    convert_state_dict,
    extract_state_dict,
    load_any_checkpoint,
    torchvision_to_d2_name,
)

logger = logging.getLogger(__name__)

# Reference MODEL.NAME -> our MODEL.VIRTEX.TASK ("virtex" is its name for bicaptioning).
TASKS = {
    "virtex": "bicaptioning",
    "bicaptioning": "bicaptioning",
    "captioning": "captioning",
    "token_classification": "token_classification",
    "multilabel_classification": "multilabel_classification",
    "masked_lm": "masked_lm",
}
_TEXTUAL = re.compile(r"^transdec_(?P<norm>postnorm|prenorm)::L(\d+)_H(\d+)_A(\d+)_F(\d+)$")
_VISUAL = re.compile(r"^torchvision::(?P<arch>resnet\d+|wide_resnet\d+_2|resnext\d+_\d+x\d+d)$")
_REFERENCE_NO_DECAY = ".*textual.(embedding|transformer).*(norm.*|bias)"
_TRAIN_TRANSFORMS = ("random_resized_crop", "horizontal_flip", "color_jitter", "normalize")
_VAL_TRANSFORMS = ["smallest_resize", "center_crop", "normalize"]


class ReferenceImportError(ValueError):
    """A reference config or checkpoint that cannot be imported faithfully."""


@dataclass
class Translation:
    """Our config values (``KEY -> value``) and notes on reference keys without an effect."""

    values: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    notes: list[str] = field(default_factory=list)


def _flatten(node: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _textual(name: str, task: str) -> dict[str, Any]:
    prefix = "MODEL.VIRTEX.TEXTUAL_HEAD."
    if task in ("token_classification", "multilabel_classification"):
        if name != "none":
            raise ReferenceImportError(
                f"MODEL.TEXTUAL.NAME is {name!r}: a {task} model has no transformer ('none')"
            )
        return {}
    m = _TEXTUAL.match(str(name))
    if not m:
        raise ReferenceImportError(
            f"MODEL.TEXTUAL.NAME {name!r} is not transdec_postnorm/transdec_prenorm::L_H_A_F"
        )
    layers, hidden, heads, ffn = (int(g) for g in m.groups()[1:])
    return {
        prefix + "NUM_LAYERS": layers,
        prefix + "HIDDEN_SIZE": hidden,
        prefix + "NUM_HEADS": heads,
        prefix + "FEEDFORWARD_SIZE": ffn,
        prefix + "NORM_FIRST": m["norm"] == "prenorm",
        prefix + "PRE_NORM_FINAL_NORM": False,
    }


def _schedule(flat: dict[str, Any]) -> dict[str, Any]:
    name = flat.get("OPTIM.LR_DECAY_NAME", "cosine")
    if name == "cosine":
        return {
            "SOLVER.LR_SCHEDULER_NAME": "WarmupCosineLR",
            "SOLVER.VIRTEX.COSINE_AFTER_WARMUP": True,
        }
    if name in ("multistep", "none"):
        steps = tuple(int(s) for s in flat.get("OPTIM.LR_STEPS", [])) if name == "multistep" else ()
        return {
            "SOLVER.LR_SCHEDULER_NAME": "WarmupMultiStepLR",
            "SOLVER.STEPS": steps,
            "SOLVER.GAMMA": float(flat.get("OPTIM.LR_GAMMA", 0.1)),
        }
    raise ReferenceImportError(
        f"OPTIM.LR_DECAY_NAME {name!r} cannot be expressed (supported: cosine, multistep, none)"
    )


def translate_config(reference: Mapping[str, Any]) -> Translation:
    """Reference config (parsed yaml) -> our config values. See the module docstring."""
    flat = _flatten(reference)
    t = Translation()
    v = t.values
    name = flat.get("MODEL.NAME", "virtex")
    if name not in TASKS:
        raise ReferenceImportError(f"MODEL.NAME {name!r} is not one of {sorted(TASKS)}")
    task = TASKS[name]
    v["MODEL.VIRTEX.TASK"] = task
    handled = {
        "MODEL.NAME",
        "MODEL.TEXTUAL.NAME",
        "OPTIM.LR_DECAY_NAME",
        "OPTIM.LR_STEPS",
        "OPTIM.LR_GAMMA",
    }
    # Missing keys take the reference's defaults (its config.py).
    default_head = "transdec_postnorm::L1_H2048_A32_F8192"
    v.update(_textual(flat.get("MODEL.TEXTUAL.NAME", default_head), task))
    v.update(_schedule(flat))
    for i, key in enumerate(
        ("DATA.UNK_INDEX", "DATA.SOS_INDEX", "DATA.EOS_INDEX", "DATA.MASK_INDEX")
    ):
        handled.add(key)
        if key in flat and int(flat[key]) != i:
            raise ReferenceImportError(f"{key} is {flat[key]}; virtex-d2 needs {i}")

    direct = {
        "RANDOM_SEED": "SEED",
        "AMP": "SOLVER.AMP.ENABLED",
        "CUDNN_BENCHMARK": "CUDNN_BENCHMARK",
        "DATA.VOCAB_SIZE": "MODEL.VIRTEX.VOCAB_SIZE",
        "DATA.MAX_CAPTION_LENGTH": "MODEL.VIRTEX.MAX_CAPTION_LENGTH",
        "DATA.MASKED_LM.MASK_PROPORTION": "MODEL.VIRTEX.MLM.MASK_PROBABILITY",
        "DATA.MASKED_LM.MASK_PROBABILITY": "MODEL.VIRTEX.MLM.MASK_TOKEN_PROBABILITY",
        "DATA.MASKED_LM.REPLACE_PROBABILITY": "MODEL.VIRTEX.MLM.REPLACE_PROBABILITY",
        "MODEL.TEXTUAL.DROPOUT": "MODEL.VIRTEX.TEXTUAL_HEAD.DROPOUT",
        "MODEL.DECODER.BEAM_SIZE": "MODEL.VIRTEX.DECODER.BEAM_SIZE",
        "MODEL.DECODER.NUCLEUS_SIZE": "MODEL.VIRTEX.DECODER.TOP_P",
        "MODEL.DECODER.MAX_DECODING_STEPS": "MODEL.VIRTEX.DECODER.MAX_LENGTH",
        "OPTIM.SGD_MOMENTUM": "SOLVER.MOMENTUM",
        "OPTIM.WEIGHT_DECAY": "SOLVER.WEIGHT_DECAY",
        "OPTIM.CLIP_GRAD_NORM": "SOLVER.VIRTEX.CLIP_GRAD_NORM",
        "OPTIM.LOOKAHEAD.USE": "SOLVER.VIRTEX.LOOKAHEAD.ENABLED",
        "OPTIM.LOOKAHEAD.ALPHA": "SOLVER.VIRTEX.LOOKAHEAD.ALPHA",
        "OPTIM.LOOKAHEAD.STEPS": "SOLVER.VIRTEX.LOOKAHEAD.STEPS",
        "OPTIM.BATCH_SIZE": "SOLVER.IMS_PER_BATCH",
        "OPTIM.CNN_LR": "SOLVER.BASE_LR",
        "OPTIM.LR": "SOLVER.VIRTEX.TEXTUAL_LR",
        "OPTIM.NUM_ITERATIONS": "SOLVER.MAX_ITER",
        "OPTIM.WARMUP_STEPS": "SOLVER.WARMUP_ITERS",
    }
    # Keys that describe where the reference found its data or how cuDNN ran, or that are
    # read elsewhere (the vocabulary is given to the importer; the CNN comes from the weights).
    irrelevant = {
        "CUDNN_DETERMINISTIC": "no Detectron2 key; set torch.backends.cudnn.deterministic",
        "DATA.ROOT": "datasets are Detectron2 datasets (DATASETS.TRAIN/TEST)",
        "DATA.TOKENIZER_MODEL": "the vocabulary is converted from --vocab",
        "MODEL.VISUAL.PRETRAINED": "the imported weights replace any initialisation",
        "DATA.USE_PERCENTAGE": "a training-data subset: choose DATASETS.TRAIN instead",
        "DATA.USE_SINGLE_CAPTION": "one caption is drawn per image and iteration anyway",
    }
    for key, value in flat.items():
        if key in handled:
            continue
        if key in direct:
            v[direct[key]] = value
        elif key in irrelevant:
            t.notes.append(f"{key} = {value!r} not carried over: {irrelevant[key]}")
        elif key == "DATA.IMAGE_CROP_SIZE":
            v["INPUT.VIRTEX.CROP_SIZE"] = v["INPUT.VIRTEX.TEST_CROP_SIZE"] = int(value)
        elif key == "DATA.IMAGE_TRANSFORM_TRAIN":
            _train_transforms(list(value), v)
        elif key == "DATA.IMAGE_TRANSFORM_VAL":
            if list(value) != _VAL_TRANSFORMS:
                raise ReferenceImportError(
                    f"DATA.IMAGE_TRANSFORM_VAL {value} cannot be expressed; supported: "
                    f"{_VAL_TRANSFORMS}"
                )
        elif key == "MODEL.VISUAL.NAME":
            if not _VISUAL.match(str(value)):
                raise ReferenceImportError(
                    f"MODEL.VISUAL.NAME {value!r} is not a torchvision ResNet "
                    "(torchvision::resnet18/34/50/101/152, wide_resnet50_2, ...)"
                )
        elif key == "MODEL.VISUAL.FEATURE_SIZE":
            pass  # checked against the weights by import_reference
        elif key == "MODEL.VISUAL.FROZEN":
            if value:
                v["MODEL.BACKBONE.FREEZE_AT"] = 5  # stem and res2..res5: the whole CNN
        elif key == "MODEL.DECODER.NAME":
            names = {"beam_search": "reference_beam", "nucleus_sampling": "reference_nucleus"}
            if value not in names:
                raise ReferenceImportError(f"MODEL.DECODER.NAME {value!r} is not one of {names}")
            v["MODEL.VIRTEX.DECODER.NAME"] = names[value]
        elif key == "OPTIM.OPTIMIZER_NAME":
            if value != "sgd":
                raise ReferenceImportError(
                    f"OPTIM.OPTIMIZER_NAME {value!r} cannot be expressed: virtex-d2 pretrains "
                    "with SGD + Lookahead only"
                )
        elif key == "OPTIM.NO_DECAY":
            if value != _REFERENCE_NO_DECAY:
                raise ReferenceImportError(
                    f"OPTIM.NO_DECAY {value!r} cannot be translated to our parameter names; only "
                    f"the reference default {_REFERENCE_NO_DECAY!r} is (SOLVER.VIRTEX."
                    "NO_DECAY_PATTERN is its equivalent)"
                )
        else:
            raise ReferenceImportError(
                f"unknown reference config key {key} (value {value!r}); it is not a key of "
                "kdexd/virtex's config, or this importer does not know what it means"
            )
    v.setdefault("MODEL.VIRTEX.DECODER.NAME", "reference_beam")
    return t


def _train_transforms(names: list[str], v: dict) -> None:
    unknown = [n for n in names if n not in _TRAIN_TRANSFORMS]
    if unknown or "random_resized_crop" not in names:
        raise ReferenceImportError(
            f"DATA.IMAGE_TRANSFORM_TRAIN {names} cannot be expressed: supported transforms are "
            f"{_TRAIN_TRANSFORMS}, random_resized_crop required"
        )
    if "horizontal_flip" not in names:
        v["INPUT.VIRTEX.HFLIP_PROBABILITY"] = 0.0
    if "color_jitter" not in names:
        v["INPUT.VIRTEX.COLOR_JITTER.PROBABILITY"] = 0.0


# ------------------------------------------------------------------------------------ weights
# Modules the reference's backward head shares with the forward one (same tensors).
_SHARED = ("visual_projection.", "embedding.", "output.")


def _textual_name(rest: str, direction: str) -> str:
    rest = (
        rest.replace("multihead_attn.", "cross_attn.")
        .replace("in_proj_weight", "in_proj.weight")
        .replace("in_proj_bias", "in_proj.bias")
    )
    if direction == "backward_textual":
        rest = "backward_" + rest  # transformer. -> backward_transformer.
    return "textual_head." + rest


def rename_state_dict(
    state: Mapping[str, torch.Tensor], task: str
) -> OrderedDict[str, torch.Tensor]:
    """Reference names -> our VirTex model's names. Raises on unknown or inconsistent keys."""
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    classifier = task in ("token_classification", "multilabel_classification")
    for key, value in state.items():
        if key.startswith("visual.cnn."):
            inner = key[len("visual.cnn.") :]
            if inner.startswith("fc."):
                continue
            name = torchvision_to_d2_name(inner)
            if name is None:
                raise ReferenceImportError(f"checkpoint key {key} is not a ResNet tensor")
            out["backbone." + name] = value
            continue
        m = re.match(r"^(textual|backward_textual)\.(.+)$", key)
        if not m:
            raise ReferenceImportError(f"unexpected checkpoint key {key}")
        direction, rest = m.groups()
        if classifier:
            if direction != "textual" or rest not in ("output.weight", "output.bias"):
                raise ReferenceImportError(f"unexpected key {key} for a {task} model")
            out["classifier." + rest[len("output.") :]] = value
        elif direction == "backward_textual" and rest.startswith(_SHARED):
            forward = state.get("textual." + rest)
            if forward is None or not torch.equal(forward, value):
                raise ReferenceImportError(
                    f"{key} should be the same tensor as textual.{rest} (the reference shares it "
                    "between directions) but differs: the checkpoint is not a reference model"
                )
        elif rest == "output.weight":
            continue  # tied to embedding.words.weight, loaded under that name
        else:
            if direction == "backward_textual" and task != "bicaptioning":
                raise ReferenceImportError(f"{key}: a {task} model has no backward head")
            out[_textual_name(rest, direction)] = value
    return out


def load_reference_weights(model: torch.nn.Module, renamed: Mapping[str, torch.Tensor]) -> None:
    """Strictly load renamed weights into ``model``; errors name the keys."""
    own = model.state_dict()
    tied_output = "textual_head.output.weight"
    expected = [k for k in own if k != tied_output]
    missing = [k for k in expected if k not in renamed]
    unexpected = [k for k in renamed if k not in own]
    wrong = [
        f"{k}: checkpoint {tuple(renamed[k].shape)} vs model {tuple(own[k].shape)}"
        for k in renamed
        if k in own and renamed[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        raise ReferenceImportError(
            "the checkpoint does not fit the model its config describes:"
            + (f"\n  missing: {missing}" if missing else "")
            + (f"\n  unexpected: {unexpected}" if unexpected else "")
            + (f"\n  shape mismatch: {wrong}" if wrong else "")
        )
    model.load_state_dict(renamed, strict=False)


def read_reference_checkpoint(path: str) -> OrderedDict[str, torch.Tensor]:
    """The model state dict of a reference checkpoint (weights only)."""
    return extract_state_dict(load_any_checkpoint(path))


def reference_backbone_overrides(
    state: Mapping[str, torch.Tensor], feature_size: int | None
) -> dict[str, Any]:
    """MODEL.RESNETS values of the checkpoint's CNN (depth and widths read from the tensors)."""
    result = convert_state_dict(state, "virtex")
    channels = result.d2_state[f"res5.0.conv{3 if result.block == 'bottleneck' else 2}.weight"]
    if feature_size is not None and channels.shape[0] != int(feature_size):
        raise ReferenceImportError(
            f"MODEL.VISUAL.FEATURE_SIZE is {feature_size} but the checkpoint's CNN ends with "
            f"{channels.shape[0]} channels"
        )
    return result.config_overrides()


def read_reference_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, Mapping):
        raise ReferenceImportError(f"{path} is not a yaml mapping of config keys")
    return dict(data)


def ensure_dir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path
