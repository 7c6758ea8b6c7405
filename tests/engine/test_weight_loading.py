"""One weight-loading path: the source is recognised from the keys, and the policy (weights only
unless opted in; a missing required tensor is an error) holds for the trainer and the tools."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch
import torchvision
from detectron2.modeling import build_model
from helpers import REPO, virtex_cfg

from virtex_d2.checkpoint.convert import (
    IncompleteBackboneError,
    convert_state_dict,
    detect_source,
    save_d2_checkpoint,
)
from virtex_d2.config import setup_cfg
from virtex_d2.engine.checkpoint import build_checkpointer


def _torchvision_r18() -> dict:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
    return model.state_dict()


def test_source_is_recognised_from_the_keys():
    tv = _torchvision_r18()
    d2 = convert_state_dict(tv, "torchvision").d2_state
    assert detect_source(tv) == ("torchvision", "")
    assert detect_source({f"visual.cnn.{k}": v for k, v in tv.items()}) == ("virtex", "visual.cnn.")
    assert detect_source(d2) == ("virtex_d2", "")
    assert detect_source({f"backbone.{k}": v for k, v in d2.items()}) == ("virtex_d2", "backbone.")
    fpn = {f"backbone.bottom_up.{k}": v for k, v in d2.items()}
    assert detect_source(fpn) == ("virtex_d2", "backbone.bottom_up.")
    assert convert_state_dict(fpn, "auto").depth == 18
    with pytest.raises(IncompleteBackboneError, match="cannot tell"):
        detect_source({"fc.weight": torch.zeros(1)})


def test_detection_model_loads_a_torchvision_checkpoint_as_model_weights(tmp_path):
    """MODEL.WEIGHTS may be a torchvision file: the checkpointer renames its ResNet."""
    tv = _torchvision_r18()
    path = tmp_path / "resnet18.pth"
    torch.save(tv, path)
    cfg = setup_cfg(
        str(REPO / "configs" / "synthetic" / "mask_rcnn_R_18_FPN.yaml"),
        ["MODEL.WEIGHTS", str(path)],
    )
    model = build_model(cfg)
    build_checkpointer(cfg, model).load(str(path))
    got = model.backbone.bottom_up.res3[0].conv1.norm.running_mean
    assert torch.equal(got, tv["layer2.0.bn1.running_mean"])


def test_caption_model_without_its_textual_head_is_refused(tmp_path, tokenizer):
    """A backbone-only file used as a captioner's weights: an error naming the head, not a
    warning and random captions."""
    from virtex_d2.engine.checkpoint import WeightsMismatchError
    from virtex_d2.engine.predictor import CaptionPredictor

    cfg = virtex_cfg(tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    backbone_only = tmp_path / "backbone.pth"
    model = build_model(cfg)
    save_d2_checkpoint(
        {
            k[len("backbone.") :]: v
            for k, v in model.state_dict().items()
            if k.startswith("backbone.")
        },
        str(backbone_only),
    )
    with pytest.raises(WeightsMismatchError, match="textual_head"):
        CaptionPredictor(cfg, str(backbone_only))


def test_caption_tool_refuses_pickles_without_the_opt_in(tmp_path, tokenizer):
    cfg = virtex_cfg(tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    config = tmp_path / "config.yaml"
    config.write_text(cfg.dump())
    weights = tmp_path / "model.pkl"
    with open(weights, "wb") as f:
        pickle.dump({"model": {}}, f)
    image = tmp_path / "img.png"
    from PIL import Image

    Image.new("RGB", (64, 64)).save(image)
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "caption_images.py"),
            "--config-file",
            str(config),
            "--weights",
            str(weights),
            "--input",
            str(image),
            "--output",
            str(tmp_path / "o.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "MODEL.ALLOW_PICKLE_WEIGHTS" in proc.stderr and "Traceback" not in proc.stderr
