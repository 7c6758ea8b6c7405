"""torch.hub entry points: pretrained VirTex backbones as torchvision ResNet feature extractors.

    model = torch.hub.load("path/to/virtex-d2", "resnet50", source="local",
                           weights="output/virtex/model_final.pth")
    features = model(images)  # images: (B, 3, H, W) float, ImageNet-normalised RGB

Each entry point returns a ``torchvision.models.ResNet`` in eval mode whose classifier is
removed (``fc = nn.Identity()``), so ``model(x)`` is the global-average-pooled output of the
last stage (res5):

| entry point | output of ``model(x)`` for x: (B, 3, H, W) |
|---|---|
| ``resnet18`` | (B, 512) |
| ``resnet50``, ``resnet101``, ``wide_resnet50_2`` | (B, 2048) |

The spatial map before pooling is (B, C, H/32, W/32) (``torch.nn.Sequential(*list(model
.children())[:-2])``). ``weights`` is any checkpoint ``virtex_d2.checkpoint.convert`` reads: a
VirTex pretraining checkpoint (``tools/train_net.py`` output), a Detectron2 backbone written by
``tools/convert_to_d2.py``, a reference-VirTex checkpoint or a torchvision state dict; it is read
with ``torch.load(weights_only=True)``. Weights of another architecture than the entry point's
are refused, naming the one that fits. Without ``weights`` the network is randomly initialised.

Only torch, torchvision and tqdm are needed (not Detectron2): the conversion modules are loaded
from their files under a private package name, without importing the ``virtex_d2`` package
(whose ``__init__`` registers Detectron2 components).
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

import torch

dependencies = ["torch", "torchvision", "tqdm"]

_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "virtex_d2")
_HUB = "_virtex_d2_hub"  # private package name the modules below are loaded under
# Modules the conversion needs, in dependency order (their relative imports stay inside).
_MODULES = ("io", "checkpoint.resnet_layout", "checkpoint.convert", "checkpoint.to_torchvision")


def _conversion_modules() -> types.SimpleNamespace:
    if f"{_HUB}.checkpoint.to_torchvision" not in sys.modules:
        for pkg, path in (
            (_HUB, _PACKAGE),
            (f"{_HUB}.checkpoint", os.path.join(_PACKAGE, "checkpoint")),
        ):
            module = types.ModuleType(pkg)
            module.__path__ = [path]
            sys.modules[pkg] = module
        for name in _MODULES:
            full = f"{_HUB}.{name}"
            spec = importlib.util.spec_from_file_location(
                full, os.path.join(_PACKAGE, *name.split(".")) + ".py"
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[full] = module  # dataclasses resolve their module through sys.modules
            spec.loader.exec_module(module)
    return types.SimpleNamespace(
        convert=sys.modules[f"{_HUB}.checkpoint.convert"],
        export=sys.modules[f"{_HUB}.checkpoint.to_torchvision"],
    )


def _feature_extractor(arch: str, weights: str | None) -> torch.nn.Module:
    import torchvision

    model = getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        modules = _conversion_modules()
        result = modules.convert.convert_checkpoint(weights, "auto")
        found = modules.export.torchvision_arch(result)
        if found != arch:
            raise ValueError(
                f"{weights} holds a {found}, not a {arch}: load it with "
                f"torch.hub.load(..., {found!r}, ...)"
            )
        missing, unexpected = model.load_state_dict(
            modules.export.d2_to_torchvision_state(result.d2_state), strict=False
        )
        if unexpected or sorted(missing) != ["fc.bias", "fc.weight"]:
            raise RuntimeError(f"{weights}: missing {missing}, unexpected {unexpected}")
    model.fc = torch.nn.Identity()
    return model.eval()


def resnet18(weights: str | None = None) -> torch.nn.Module:
    """ResNet-18 feature extractor: (B, 3, H, W) -> (B, 512)."""
    return _feature_extractor("resnet18", weights)


def resnet50(weights: str | None = None) -> torch.nn.Module:
    """ResNet-50 feature extractor (the paper's backbone): (B, 3, H, W) -> (B, 2048)."""
    return _feature_extractor("resnet50", weights)


def resnet101(weights: str | None = None) -> torch.nn.Module:
    """ResNet-101 feature extractor: (B, 3, H, W) -> (B, 2048)."""
    return _feature_extractor("resnet101", weights)


def wide_resnet50_2(weights: str | None = None) -> torch.nn.Module:
    """Wide ResNet-50-2 feature extractor (the paper's R-50-W2X): (B, 3, H, W) -> (B, 2048)."""
    return _feature_extractor("wide_resnet50_2", weights)
