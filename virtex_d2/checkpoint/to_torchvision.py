"""Detectron2 backbone weights back to a torchvision ResNet (``tools/convert_to_d2.py --to
torchvision``, ``hubconf.py``), through the same rename table as :mod:`.convert`."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch

from ..io import atomic_write
from .convert import ConversionResult
from .resnet_layout import BN_COUNTER, d2_to_torchvision_name

# (depth, groups, width per group) -> torchvision's builder; basic blocks report width 64.
_TORCHVISION_ARCHS = {
    (18, 1, 64): "resnet18",
    (34, 1, 64): "resnet34",
    (50, 1, 64): "resnet50",
    (101, 1, 64): "resnet101",
    (152, 1, 64): "resnet152",
    (50, 1, 128): "wide_resnet50_2",
    (101, 1, 128): "wide_resnet101_2",
    (50, 32, 4): "resnext50_32x4d",
    (101, 32, 8): "resnext101_32x8d",
}


def torchvision_arch(result: ConversionResult) -> str:
    """The ``torchvision.models`` builder whose network these weights fit, e.g. "resnet50"."""
    key = (result.depth, result.num_groups, result.width_per_group)
    if key not in _TORCHVISION_ARCHS or result.stem_out_channels != 64:
        raise ValueError(
            f"a ResNet-{result.depth} with {result.num_groups}x{result.width_per_group}d blocks "
            f"and a {result.stem_out_channels}-channel stem has no torchvision counterpart"
        )
    return _TORCHVISION_ARCHS[key]


def d2_to_torchvision_state(
    d2_state: Mapping[str, torch.Tensor],
) -> OrderedDict[str, torch.Tensor]:
    """Detectron2 backbone names -> a torchvision ResNet state dict without ``fc``.

    BN ``num_batches_tracked`` counters (not converted to Detectron2) come back as 0, so
    ``torchvision.models.resnetXX().load_state_dict(sd, strict=False)`` misses only ``fc.*``.
    """
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, tensor in d2_state.items():
        out[d2_to_torchvision_name(name)] = tensor.detach().cpu().contiguous()
        if name.endswith(".norm.running_var"):
            counter = name[: -len("running_var")] + BN_COUNTER
            out[d2_to_torchvision_name(counter)] = torch.tensor(0, dtype=torch.long)
    return out


def save_torchvision_state(state: Mapping[str, torch.Tensor], path: str) -> None:
    """Write a plain state dict (``torch.load(weights_only=True)`` reads it), atomically."""
    atomic_write(path, lambda f: torch.save(OrderedDict(state), f))
