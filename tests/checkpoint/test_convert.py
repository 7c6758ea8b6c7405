"""Backbone conversion: converted weights load completely into R-FPN and R-C4 models and give the
same features as the source network (torchvision, reference VirTex and our own layouts)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest
import torch
import torchvision
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from helpers import REPO, load_tool, make_tokenizer, virtex_cfg
from torch import nn

import virtex_d2
from virtex_d2.checkpoint.convert import (
    IncompleteBackboneError,
    convert_checkpoint,
    d2_to_torchvision_name,
    load_any_checkpoint,
    save_d2_checkpoint,
    torchvision_to_d2_name,
)
from virtex_d2.modeling.roi_heads import Res5ROIHeadsExtraNorm

STAGES = ("res2", "res3", "res4", "res5")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ source networks
def randomise_norms_(module: nn.Module, seed: int) -> nn.Module:
    """Random affine parameters and running statistics in every BN, so that a converter that
    skipped or swapped any of them gives different features."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)
    return module.eval()


def torchvision_features(net: torchvision.models.ResNet, x: torch.Tensor) -> dict:
    """res2..res5 of a torchvision ResNet: (1, C, H/4 .. H/32, W/4 .. W/32)."""
    x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
    out = {}
    for name, layer in zip(STAGES, (net.layer1, net.layer2, net.layer3, net.layer4)):
        x = layer(x)
        out[name] = x
    return out


class FakeVirTex(nn.Module):
    """Our meta-architecture's checkpoint layout: a Detectron2 ResNet under ``backbone`` next to
    modules that must be reported as unused."""

    def __init__(self, depth: int):
        super().__init__()
        cfg = get_cfg()
        cfg.MODEL.RESNETS.DEPTH = depth
        cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False
        cfg.MODEL.RESNETS.NORM = "BN"
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        if depth in (18, 34):
            cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
        self.backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))
        width = self.backbone.output_shape()["res5"].channels
        self.visual_projection = nn.Linear(width, 32)
        self.textual_head = nn.Sequential(nn.Embedding(50, 32), nn.LayerNorm(32))


# ---------------------------------------------------------------------------- detectron2 models
def detection_cfg(config: str, **overrides):
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / config))
    cfg.MODEL.DEVICE = "cpu"
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return cfg


@pytest.fixture(scope="module")
def fpn_r50():
    # The real COCO ImageNet config (SyncBN: equal to BN in eval mode).
    return build_model(detection_cfg("detection/coco_mask_rcnn_R_50_FPN_2x_imagenet.yaml")).eval()


@pytest.fixture(scope="module")
def c4_r50():
    # Detectron2's own Res5ROIHeads with frozen BN; res2/res3 exported so they can be compared.
    cfg = detection_cfg(
        "detection/voc_faster_rcnn_R_50_C4_24k_imagenet.yaml",
        **{
            "MODEL.ROI_HEADS.NAME": "Res5ROIHeads",
            "MODEL.RESNETS.NORM": "FrozenBN",
            "MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4"],
        },
    )
    return build_model(cfg).eval()


def load_with_log(model: nn.Module, path: str, caplog) -> list:
    """Load like ``MODEL.WEIGHTS`` does; return the checkpointer's log messages."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        DetectionCheckpointer(model).load(path)
    return [ANSI.sub("", r.getMessage()) for r in caplog.records]


def reported_missing(log: list) -> list:
    """Model keys (grouped, e.g. ``a.b.{bias, weight}``) the checkpointer reported missing."""
    header = "Some model parameters or buffers are not found in the checkpoint:"
    return [line.strip() for m in log if m.startswith(header) for line in m.splitlines()[1:]]


def expected_model_keys(model: nn.Module) -> dict:
    """Model key -> Detectron2 backbone name, for every backbone parameter and buffer (BN
    counters excluded, see convert.py; the extra ROI-head norm is new, not pretrained)."""
    keys = {}
    for k in model.state_dict():
        if k.endswith("num_batches_tracked") or k.startswith("roi_heads.res5.norm."):
            continue
        for prefix in ("backbone.bottom_up.", "roi_heads.", "backbone."):
            rest = k[len(prefix) :]
            if k.startswith(prefix) and rest.split(".")[0] in ("stem",) + STAGES:
                keys[k] = rest
                break
    return keys


def assert_fully_loaded(model: nn.Module, d2_state: dict, log: str) -> None:
    state = model.state_dict()
    expected = expected_model_keys(model)
    assert expected, "model has no backbone keys?"
    for model_key, d2_name in expected.items():
        assert d2_name in d2_state, f"{model_key}: no converted tensor {d2_name}"
        assert torch.equal(state[model_key], d2_state[d2_name]), f"{model_key} not loaded"
    assert not any("Skip loading parameter" in m for m in log)
    # Whatever the checkpointer calls missing must lie outside the pretrained backbone.
    backbone = ("backbone.bottom_up.", "backbone.stem.", "backbone.res", "roi_heads.res5.")
    for group in reported_missing(log):
        assert not group.startswith(backbone) or group.startswith("roi_heads.res5.norm."), group


def assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    assert actual.shape == expected.shape, name
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, msg=name)


def fpn_features(model, x):
    return model.backbone.bottom_up(x)


def c4_features(model, x):
    feats = dict(model.backbone(x))
    # Run the ROI head's res5 blocks as a dense network on the whole res4 map.
    res5 = [m for name, m in model.roi_heads.res5.named_children() if name != "norm"]
    feats["res5"] = nn.Sequential(*res5)(feats["res4"])
    return feats


# ------------------------------------------------------------------------------ the three sources
def make_source(source: str, tmp_path: Path):
    """(file to convert, reference res2..res5 features of the source network on X)."""
    if source in ("torchvision", "virtex"):
        net = randomise_norms_(torchvision.models.resnet50(), seed=1)
        with torch.no_grad():
            ref = torchvision_features(net, X)
        sd = net.state_dict()
        if source == "virtex":
            model = {f"visual.cnn.{k}": v for k, v in sd.items()}
            model["textual.embedding.words.weight"] = torch.randn(10, 4)
            model["textual.output.bias"] = torch.zeros(10)
            obj = {"model": model, "optimizer": {"state": {}, "param_groups": []}, "iteration": 7}
        else:
            obj = sd
    else:
        net = randomise_norms_(FakeVirTex(50), seed=2)
        with torch.no_grad():
            ref = net.backbone(X)
        obj = {"model": net.state_dict(), "iteration": 500}
    path = tmp_path / f"{source}.pth"
    torch.save(obj, path)
    return str(path), ref


@pytest.mark.parametrize("source", ["torchvision", "virtex", "virtex_d2"])
def test_converted_r50_gives_same_features_in_fpn_and_c4(source, tmp_path, fpn_r50, c4_r50, caplog):
    path, ref = make_source(source, tmp_path)
    result = convert_checkpoint(path, source)
    assert (result.depth, result.block, result.width_per_group) == (50, "bottleneck", 64)
    assert len(result.dropped_keys) == 53  # one num_batches_tracked per BN
    assert all("num_batches_tracked" not in k for k in result.d2_state)
    expected_unused = {
        "torchvision": {"fc.weight", "fc.bias"},
        "virtex": {
            "visual.cnn.fc.weight",
            "visual.cnn.fc.bias",
            "textual.embedding.words.weight",
            "textual.output.bias",
        },
        "virtex_d2": {
            "visual_projection.weight",
            "visual_projection.bias",
            "textual_head.0.weight",
            "textual_head.1.weight",
            "textual_head.1.bias",
        },
    }[source]
    assert set(result.unused_keys) == expected_unused
    out = tmp_path / "d2.pth"
    save_d2_checkpoint(result, str(out))

    for model, features in ((fpn_r50, fpn_features), (c4_r50, c4_features)):
        log = load_with_log(model, str(out), caplog)
        assert_fully_loaded(model, result.d2_state, log)
        assert not any("not used by the model" in m for m in log)  # every tensor found a home
        assert reported_missing(log)  # the heads are new, so the log check is not vacuous
        with torch.no_grad():
            got = features(model, X)
        for name in STAGES:
            assert_close(got[name], ref[name], f"{source} {name}")


def test_r18_fills_fpn_and_basicblock_c4_head(tmp_path, caplog):
    """A Detectron2 R-18 (our pretraining backbone at CPU scale) into the synthetic R-18 FPN and
    C4 configs; Res5ROIHeadsExtraNorm builds a BasicBlock res5 that takes the res5 weights."""
    net = randomise_norms_(FakeVirTex(18), seed=3)
    with torch.no_grad():
        ref = net.backbone(X)
    src = tmp_path / "r18.pth"
    torch.save({"model": net.state_dict()}, src)
    result = convert_checkpoint(str(src), "virtex_d2")
    assert (result.depth, result.block, result.res2_out_channels) == (18, "basic", 64)
    out = tmp_path / "r18_d2.pth"
    save_d2_checkpoint(result, str(out))

    fpn = build_model(detection_cfg("synthetic/mask_rcnn_R_18_FPN.yaml")).eval()
    c4 = build_model(
        detection_cfg(
            "synthetic/voc_faster_rcnn_R_18_C4.yaml",
            **{"MODEL.RESNETS.OUT_FEATURES": ["res2", "res3", "res4"]},
        )
    ).eval()
    assert isinstance(c4.roi_heads, Res5ROIHeadsExtraNorm)
    for model, features in ((fpn, fpn_features), (c4, c4_features)):
        log = load_with_log(model, str(out), caplog)
        assert_fully_loaded(model, result.d2_state, log)
        with torch.no_grad():
            got = features(model, X)
        for name in STAGES:
            assert_close(got[name], ref[name], f"R-18 {name}")
    # The extra norm is not pretrained: it keeps its identity initialisation.
    norm = c4.roi_heads.res5.norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    assert torch.equal(norm.running_var, torch.ones_like(norm.running_var))


def test_real_virtex_model_checkpoint_converts(tmp_path, caplog):
    """The lead's VirTex meta-architecture, saved by Detectron2's checkpointer, converts fully."""
    tok = make_tokenizer(tmp_path)
    cfg = virtex_cfg(
        "bicaptioning",
        depth=18,
        tokenizer_path=str(tmp_path / "vocab_64.json"),
        vocab_size=tok.get_vocab_size(),
    )
    model = randomise_norms_(build_model(cfg), seed=4)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final", iteration=3)
    result = convert_checkpoint(str(tmp_path / "model_final.pth"), "virtex_d2")
    assert result.depth == 18
    assert result.unused_keys and not any(k.startswith("backbone.") for k in result.unused_keys)
    backbone_state = {
        k[len("backbone.") :]: v
        for k, v in model.state_dict().items()
        if k.startswith("backbone.") and not k.endswith("num_batches_tracked")
    }
    assert backbone_state.keys() == result.d2_state.keys()
    assert all(torch.equal(backbone_state[k], v) for k, v in result.d2_state.items())


# ------------------------------------------------------------------------------ refusal and I/O
def cli_main(argv: list) -> int:
    return load_tool("convert_to_d2").main(argv)


def test_missing_tensor_is_refused_with_its_name(tmp_path, capsys):
    sd = torchvision.models.resnet50().state_dict()
    del sd["layer3.2.bn2.running_var"]
    with pytest.raises(IncompleteBackboneError) as err:
        convert_checkpoint({"model": sd}, "torchvision")
    assert err.value.missing == ["res4.2.conv2.norm.running_var"]
    assert "layer3.2.bn2.running_var" in str(err.value)

    # A block missing in the middle of a stage is not mistaken for a shallower network.
    sd = torchvision.models.resnet50().state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("layer3.3.")}
    with pytest.raises(IncompleteBackboneError) as err:
        convert_checkpoint(sd, "torchvision")
    assert "res4.3.conv1.weight" in err.value.missing

    # The CLI refuses and writes nothing.
    src, out = tmp_path / "broken.pth", tmp_path / "out.pth"
    torch.save(sd, src)
    assert cli_main(["--source", "torchvision", str(src), str(out)]) == 1
    assert not out.exists()
    assert "res4.3.conv1.weight" in capsys.readouterr().err


def test_written_file_loads_weights_only_and_cli_reports_unused(tmp_path, capsys):
    src, out = tmp_path / "tv18.pth", tmp_path / "sub" / "tv18_d2.pth"
    torch.save({"state_dict": torchvision.models.resnet18().state_dict()}, src)
    assert cli_main(["--source", "torchvision", "--depth", "18", str(src), str(out)]) == 0
    text = capsys.readouterr().out
    assert "ResNet-18" in text and "fc.weight" in text and "fc.bias" in text
    ckpt = torch.load(out, map_location="cpu", weights_only=True)
    assert ckpt["__author__"] == "virtex_d2" and ckpt["matching_heuristics"] is True
    assert len(ckpt["model"]) == 100  # 20 convs x (weight + 4 norm tensors)
    assert "stem.conv1.norm.running_var" in ckpt["model"]
    with pytest.raises(ValueError, match="ResNet-50"):
        convert_checkpoint(str(src), "torchvision", expected_depth=50)


def test_wrappers_and_pickles():
    sd = torchvision.models.resnet18().state_dict()
    plain = convert_checkpoint(sd, "torchvision").d2_state
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    ddp = convert_checkpoint(wrapped, "torchvision")
    assert plain.keys() == ddp.d2_state.keys()
    with pytest.raises(ValueError, match="pkl"):
        load_any_checkpoint("R-50.pkl")


@pytest.mark.parametrize(
    "builder,depth,groups,width",
    [
        (torchvision.models.resnet34, 34, 1, 64),
        (torchvision.models.resnet101, 101, 1, 64),
        (torchvision.models.wide_resnet50_2, 50, 1, 128),
        (torchvision.models.resnext50_32x4d, 50, 32, 4),
    ],
)
def test_inferred_architecture_builds_a_matching_d2_resnet(builder, depth, groups, width):
    result = convert_checkpoint(builder().state_dict(), "torchvision")
    assert (result.depth, result.num_groups, result.width_per_group) == (depth, groups, width)
    cfg = get_cfg()
    for key, value in result.config_overrides().items():
        setattr(cfg.MODEL.RESNETS, key.rsplit(".", 1)[1], value)
    cfg.MODEL.RESNETS.OUT_FEATURES = list(STAGES)
    d2 = build_resnet_backbone(cfg, ShapeSpec(channels=3)).state_dict()
    d2 = {k: v.shape for k, v in d2.items() if not k.endswith("num_batches_tracked")}
    assert d2 == {k: v.shape for k, v in result.d2_state.items()}


def test_name_mapping_round_trips():
    for tv in (
        "conv1.weight",
        "bn1.bias",
        "layer1.0.downsample.1.running_mean",
        "layer4.2.conv3.weight",
        "layer2.1.bn2.running_var",
    ):
        assert d2_to_torchvision_name(torchvision_to_d2_name(tv)) == tv
    assert torchvision_to_d2_name("layer1.0.downsample.0.weight") == "res2.0.shortcut.weight"
    assert torchvision_to_d2_name("bn1.weight") == "stem.conv1.norm.weight"
    assert torchvision_to_d2_name("fc.weight") is None
