"""The names and shape of a Detectron2 ResNet (used by :mod:`.convert`): the rename table
between torchvision's and Detectron2's tensor names, which blocks and stages a state dict holds,
which tensors a complete backbone of that shape must have, and the ``MODEL.RESNETS`` values it
needs."""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
BN_COUNTER = "num_batches_tracked"

# Detectron2 ResNet names: stem.conv1 / res{2-5}.{block}.{conv1-3,shortcut}, each a conv with
# its norm under ".norm".
_D2_NAME = re.compile(
    r"^(?P<conv>stem\.conv1|res[2-5]\.\d+\.(?:conv[1-3]|shortcut))"
    r"\.(?P<tensor>weight|norm\.(?:weight|bias|running_mean|running_var|num_batches_tracked))$"
)
_TV_STEM = re.compile(r"^(?P<kind>conv1|bn1)\.(?P<tensor>\w+)$")
_TV_BLOCK = re.compile(
    r"^layer(?P<layer>[1-4])\.(?P<block>\d+)\."
    r"(?:(?P<kind>conv|bn)(?P<idx>[1-3])|downsample\.(?P<ds>[01]))\.(?P<tensor>\w+)$"
)


def torchvision_to_d2_name(name: str) -> str | None:
    """``layer2.0.bn1.running_mean`` -> ``res3.0.conv1.norm.running_mean``; None if not a ResNet
    tensor of the stem or res2..res5 (e.g. ``fc.weight``)."""
    m = _TV_STEM.match(name)
    if m:
        conv = "stem.conv1"
        kind = m["kind"]
    else:
        m = _TV_BLOCK.match(name)
        if not m:
            return None
        base = f"res{int(m['layer']) + 1}.{m['block']}"
        if m["ds"] is not None:
            conv, kind = f"{base}.shortcut", ("conv" if m["ds"] == "0" else "bn")
        else:
            conv = f"{base}.conv{m['idx']}"
            kind = "conv" if m["kind"] == "conv" else "bn"
    tensor = m["tensor"]
    if kind.startswith("conv"):
        return f"{conv}.weight" if tensor == "weight" else None
    if tensor in NORM_TENSORS or tensor == BN_COUNTER:
        return f"{conv}.norm.{tensor}"
    return None


def is_d2_resnet_name(name: str) -> bool:
    """Whether ``name`` is a tensor of a Detectron2 ResNet's stem or res2..res5."""
    return _D2_NAME.match(name) is not None


def d2_to_torchvision_name(name: str) -> str:
    """Inverse of :func:`torchvision_to_d2_name` (used to report missing tensors)."""
    m = _D2_NAME.match(name)
    if not m:
        raise ValueError(f"not a Detectron2 ResNet tensor name: {name}")
    conv, tensor = m["conv"], m["tensor"]
    is_norm = tensor.startswith("norm.")
    leaf = tensor[len("norm.") :] if is_norm else tensor
    if conv == "stem.conv1":
        return f"{'bn1' if is_norm else 'conv1'}.{leaf}"
    stage, block, part = conv.split(".")
    base = f"layer{int(stage[3:]) - 1}.{block}"
    if part == "shortcut":
        return f"{base}.downsample.{1 if is_norm else 0}.{leaf}"
    return f"{base}.{'bn' if is_norm else 'conv'}{part[4:]}.{leaf}"


def infer_structure(d2_state: Mapping[str, torch.Tensor]) -> tuple[str, tuple[int, ...]]:
    """Block type and number of blocks per stage (highest block index + 1, so a gap inside a
    stage shows up as missing tensors rather than as a shallower network)."""
    blocks = {s: -1 for s in range(2, 6)}
    bottleneck = False
    for name in d2_state:
        m = re.match(r"^res([2-5])\.(\d+)\.(\w+)\.", name)
        if m:
            stage, idx = int(m[1]), int(m[2])
            blocks[stage] = max(blocks[stage], idx)
            bottleneck |= m[3] == "conv3"
    counts = tuple(blocks[s] + 1 for s in range(2, 6))
    return ("bottleneck" if bottleneck else "basic"), counts


def expected_names(d2_state: Mapping[str, torch.Tensor], block: str, counts) -> list[str]:
    """Every tensor name a complete backbone of this shape has (BN counters excluded)."""
    convs = ["stem.conv1"]
    n_convs = 3 if block == "bottleneck" else 2
    for stage, n_blocks in zip(range(2, 6), counts):
        for b in range(n_blocks):
            prefix = f"res{stage}.{b}"
            convs += [f"{prefix}.conv{i}" for i in range(1, n_convs + 1)]
            if b == 0 and _needs_shortcut(d2_state, stage, n_convs):
                convs.append(f"{prefix}.shortcut")
    names = []
    for conv in convs:
        names.append(f"{conv}.weight")
        names += [f"{conv}.norm.{t}" for t in NORM_TENSORS]
    return names


def _needs_shortcut(d2_state: Mapping[str, torch.Tensor], stage: int, n_convs: int) -> bool:
    """A projection shortcut exists where the first block downsamples (res3..res5) or changes
    the channel count (res2 of bottleneck nets: 64 -> 256)."""
    if stage > 2 or f"res{stage}.0.shortcut.weight" in d2_state:
        return True
    first = d2_state.get(f"res{stage}.0.conv1.weight")
    last = d2_state.get(f"res{stage}.0.conv{n_convs}.weight")
    if first is None or last is None:
        return False  # those convs are reported missing anyway
    return first.shape[1] != last.shape[0]


def shape_of(d2_state: Mapping[str, torch.Tensor], block: str) -> dict[str, int]:
    stem_out = d2_state["stem.conv1.weight"].shape[0]
    if block == "basic":
        return dict(
            num_groups=1,
            width_per_group=64,  # unused by Detectron2's BasicBlock; its default
            res2_out_channels=d2_state["res2.0.conv2.weight"].shape[0],
            stem_out_channels=stem_out,
        )
    bottleneck = d2_state["res2.0.conv1.weight"].shape[0]
    # conv2 is grouped: its weight is (C_out, C_in / groups, 3, 3).
    num_groups = bottleneck // d2_state["res2.0.conv2.weight"].shape[1]
    return dict(
        num_groups=num_groups,
        width_per_group=bottleneck // num_groups,
        res2_out_channels=d2_state["res2.0.conv3.weight"].shape[0],
        stem_out_channels=stem_out,
    )
