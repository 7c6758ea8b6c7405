"""Convert pretrained ResNets into Detectron2 backbone checkpoints (the one conversion module).

Three sources are understood:

- ``virtex_d2``: a checkpoint of this project's VirTex meta-architecture, written by Detectron2's
  checkpointer (``{"model": state_dict, "iteration": ...}``). The visual backbone is a Detectron2
  ``ResNet`` under ``backbone.``, so its names are already Detectron2 names.
- ``virtex``: a checkpoint of the reference VirTex code (``{"model": state_dict, ...}``), whose
  CNN is a torchvision ResNet under ``visual.cnn.``.
- ``torchvision``: a torchvision ResNet state dict (the ImageNet-supervised baseline), plain or
  wrapped in ``{"state_dict": ...}`` / ``{"model": ...}``.

The output is ``{"model": {Detectron2 names without "backbone."}, "__author__": "virtex_d2",
"matching_heuristics": True}``. ``matching_heuristics`` makes ``DetectionCheckpointer`` match
each model key to the checkpoint key that is its longest dotted suffix, so ``res2.0.conv1.weight``
lands in ``backbone.bottom_up.res2.0.conv1.weight`` (FPN) or ``backbone.res2.0.conv1.weight``, and
``res5.*`` in ``roi_heads.res5.*`` (C4), without one file per architecture.

BatchNorm ``num_batches_tracked`` counters are dropped (and reported as such): they are
pretraining bookkeeping, not weights. Detectron2's BN layers use a fixed momentum, so the counter
never affects their outputs; torch's BN fills a missing counter in when loading a dict without
version metadata (which is what the checkpointer passes), and ``FrozenBatchNorm2d`` has no such
buffer, so keeping it would only produce "unexpected key" warnings for frozen backbones.

The reverse direction, :func:`d2_to_torchvision_state`, turns any of these (or a Detectron2
backbone file written here) into a torchvision ResNet state dict, with the same rename table read
backwards (:func:`d2_to_torchvision_name`); ``hubconf.py`` and ``tools/convert_to_d2.py --to
torchvision`` use it. It assumes torchvision's stride placement (the 3x3 conv), which is what
VirTex uses (``MODEL.RESNETS.STRIDE_IN_1X1 False``); weights trained with the stride in the 1x1
conv (Detectron2's MSRA models) convert without error but compute different features.

Conversion refuses (:class:`IncompleteBackboneError`) unless every conv and norm of the stem and
of res2..res5 for the inferred depth is present with all of weight, bias, running_mean and
running_var: a silently missing running statistic would load as the identity transform.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..io import atomic_write
from .resnet_layout import (
    BN_COUNTER,
    d2_to_torchvision_name,
    expected_names,
    infer_structure,
    is_d2_resnet_name,
    shape_of,
    torchvision_to_d2_name,
)

__all__ = [
    "SOURCES",
    "ConversionResult",
    "IncompleteBackboneError",
    "convert_checkpoint",
    "convert_state_dict",
    "detect_source",
    "extract_state_dict",
    "load_any_checkpoint",
    "save_d2_checkpoint",
    "torchvision_to_d2_name",
    "d2_to_torchvision_name",
    "detect_source",
]

SOURCES = ("virtex_d2", "virtex", "torchvision")
# "auto" recognises the source from the keys (see detect_source).
SOURCE_CHOICES = ("auto", *SOURCES)

# Where the ResNet lives inside each source's state dict.
DEFAULT_PREFIX = {"virtex_d2": "backbone.", "virtex": "visual.cnn.", "torchvision": ""}

# (block type, blocks in res2..res5) -> depth, as in Detectron2's build_resnet_backbone.
_DEPTHS = {
    ("basic", (2, 2, 2, 2)): 18,
    ("basic", (3, 4, 6, 3)): 34,
    ("bottleneck", (3, 4, 6, 3)): 50,
    ("bottleneck", (3, 4, 23, 3)): 101,
    ("bottleneck", (3, 8, 36, 3)): 152,
}


class IncompleteBackboneError(ValueError):
    """The source lacks tensors of the backbone; ``missing`` lists them (Detectron2 names)."""

    def __init__(self, message: str, missing: list[str] | None = None):
        super().__init__(message)
        self.missing = list(missing or [])


@dataclass
class ConversionResult:
    """Outcome of a conversion.

    Attributes:
        d2_state: Detectron2 backbone names (no ``backbone.`` prefix) -> tensors, e.g.
            ``"res2.0.conv1.weight"``: (C_out, C_in, k, k).
        renamed: source key -> Detectron2 name, for every converted tensor.
        unused_keys: source keys that are not part of the ResNet (textual head, ``fc``, ...).
        dropped_keys: BN ``num_batches_tracked`` counters, deliberately not converted.
        depth / block / num_groups / width_per_group / res2_out_channels / stem_out_channels:
            the architecture inferred from the tensors, i.e. the MODEL.RESNETS.* values a model
            must use to load the file.
    """

    source: str
    d2_state: OrderedDict[str, torch.Tensor]
    renamed: dict[str, str]
    unused_keys: list[str]
    dropped_keys: list[str]
    depth: int
    block: str
    num_groups: int
    width_per_group: int
    res2_out_channels: int
    stem_out_channels: int
    notes: list[str] = field(default_factory=list)

    def config_overrides(self) -> dict[str, Any]:
        """MODEL.RESNETS values a Detectron2 model needs for these weights."""
        return {
            "MODEL.RESNETS.DEPTH": self.depth,
            "MODEL.RESNETS.NUM_GROUPS": self.num_groups,
            "MODEL.RESNETS.WIDTH_PER_GROUP": self.width_per_group,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": self.res2_out_channels,
            "MODEL.RESNETS.STEM_OUT_CHANNELS": self.stem_out_channels,
            # Not visible in the weights: torchvision and VirTex put the stride on the 3x3 conv.
            "MODEL.RESNETS.STRIDE_IN_1X1": False,
        }

    def summary(self) -> str:
        """Human-readable multi-line summary (counts, architecture, notes)."""
        lines = [
            f"source: {self.source}",
            f"architecture: ResNet-{self.depth} ({self.block} blocks, "
            f"{self.num_groups}x{self.width_per_group}d, res2 out {self.res2_out_channels})",
            f"converted tensors: {len(self.d2_state)}",
            f"dropped BN counters ({BN_COUNTER}): {len(self.dropped_keys)}",
            f"unused source keys: {len(self.unused_keys)}",
        ]
        lines += [f"note: {n}" for n in self.notes]
        lines.append("config: " + " ".join(f"{k} {v}" for k, v in self.config_overrides().items()))
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------ I/O


def load_any_checkpoint(path: str) -> dict[str, Any]:
    """Load a ``.pth``/``.pt``/``.pyth`` file with ``torch.load(weights_only=True)`` on the CPU.

    Pickle files (``.pkl``) are refused: unpickling runs arbitrary code, and neither VirTex nor
    torchvision distributes its ResNets that way.
    """
    if path.endswith(".pkl"):
        raise ValueError(
            f"{path}: refusing to unpickle a .pkl file; give a torch checkpoint (.pth) instead"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (re-raised with the path and the reason)
        raise RuntimeError(
            f"{path}: cannot be read with torch.load(weights_only=True): {e}. Re-save just the "
            "model's state dict (torch.save(model.state_dict(), path))."
        ) from e
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a dict, got {type(obj).__name__}")
    return dict(obj)


def extract_state_dict(checkpoint: Mapping[str, Any]) -> OrderedDict[str, torch.Tensor]:
    """Return the model state dict inside a checkpoint.

    ``{"model": sd, ...}`` (Detectron2, reference VirTex) and ``{"state_dict": sd, ...}`` are
    unwrapped; anything else is taken to be a state dict already. A ``module.`` prefix on every
    key (a model saved inside DistributedDataParallel) is stripped. Numpy arrays become tensors.
    """
    state: Mapping[str, Any] = checkpoint
    for wrapper in ("model", "state_dict"):
        if isinstance(checkpoint.get(wrapper), Mapping):
            state = checkpoint[wrapper]
            break
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            try:
                value = torch.as_tensor(value)
            except (TypeError, ValueError, RuntimeError) as e:
                raise TypeError(f"state dict entry {key!r} is not a tensor: {type(value)}") from e
        out[key] = value
    if out and all(k.startswith("module.") for k in out):
        out = OrderedDict((k[len("module.") :], v) for k, v in out.items())
    return out


def save_d2_checkpoint(result: ConversionResult | Mapping[str, torch.Tensor], path: str):
    """Write a Detectron2 backbone checkpoint loadable as ``MODEL.WEIGHTS``.

    Only tensors, a string and a bool are stored, so ``torch.load(weights_only=True)`` reads it.
    """
    state = result.d2_state if isinstance(result, ConversionResult) else result
    payload = {
        "model": OrderedDict((k, v.detach().cpu().contiguous()) for k, v in state.items()),
        "__author__": "virtex_d2",
        "matching_heuristics": True,
    }
    # An interrupted run never leaves half a file.
    atomic_write(path, lambda f: torch.save(payload, f))


# ---------------------------------------------------------------------------------- conversion
# (key that identifies the layout, source, prefix of the ResNet), most specific first.
_LAYOUTS = (
    ("backbone.bottom_up.stem.conv1.weight", "virtex_d2", "backbone.bottom_up."),  # R-FPN model
    ("backbone.stem.conv1.weight", "virtex_d2", "backbone."),  # VirTex / C4 / classifier run
    ("stem.conv1.weight", "virtex_d2", ""),  # a converted backbone (tools/convert_to_d2.py)
    ("visual.cnn.conv1.weight", "virtex", "visual.cnn."),  # the reference implementation
    ("conv1.weight", "torchvision", ""),  # a torchvision ResNet
)


def detect_source(state: Mapping[str, Any]) -> tuple[str, str]:
    """(source, prefix) of a state dict, recognised from its keys: a virtex-d2 checkpoint (any
    meta-architecture), a converted backbone, a reference VirTex checkpoint or a torchvision
    ResNet. Raises :class:`IncompleteBackboneError` naming a few keys when none fits."""
    for key, source, prefix in _LAYOUTS:
        if key in state:
            return source, prefix
    raise IncompleteBackboneError(
        f"cannot tell what kind of checkpoint this is ({len(state)} keys, e.g. "
        f"{list(state)[:4]}): expected a virtex-d2 / Detectron2 checkpoint (backbone.*), a "
        "converted backbone (stem.*, res2.*), a reference VirTex checkpoint (visual.cnn.*) or "
        "a torchvision ResNet (conv1.*, layer1.*)"
    )


def convert_state_dict(
    state: Mapping[str, torch.Tensor],
    source: str,
    *,
    prefix: str | None = None,
    expected_depth: int | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Rename a source state dict's ResNet tensors to Detectron2 backbone names.

    Args:
        state: the model state dict (already unwrapped, see :func:`extract_state_dict`).
        source: one of :data:`SOURCES`, or "auto" to recognise it from the keys.
        prefix: where the ResNet lives in ``state``; defaults to ``backbone.`` (virtex_d2),
            ``visual.cnn.`` (virtex) or nothing (torchvision).
        expected_depth: if given, refuse a network of any other depth.
        progress: show a tqdm bar over the source keys.

    Raises:
        IncompleteBackboneError: the backbone is not complete (message lists what is missing).
    """
    if source == "auto":
        source, detected = detect_source(state)
        prefix = detected if prefix is None else prefix
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCE_CHOICES}")
    prefix = DEFAULT_PREFIX[source] if prefix is None else prefix
    d2_state: OrderedDict[str, torch.Tensor] = OrderedDict()
    renamed: dict[str, str] = {}
    unused: list[str] = []
    dropped: list[str] = []
    for key in tqdm(state, desc=f"converting ({source})", unit="tensor", disable=not progress):
        name = None
        if key.startswith(prefix):
            inner = key[len(prefix) :]
            if source == "virtex_d2":
                name = inner if is_d2_resnet_name(inner) else None
            else:
                name = torchvision_to_d2_name(inner)
        if name is None:
            unused.append(key)
        elif name.endswith("." + BN_COUNTER):
            dropped.append(key)
        else:
            if name in d2_state:
                raise ValueError(f"two source keys map to {name} (second: {key})")
            d2_state[name] = state[key]
            renamed[key] = name

    if not d2_state:
        hints = [
            s
            for s, p in DEFAULT_PREFIX.items()
            if s != source and f"{p}{'stem.' if s == 'virtex_d2' else ''}conv1.weight" in state
        ]
        hint = f"; it looks like --source {hints[0]}" if hints else ""
        raise IncompleteBackboneError(
            f"no ResNet tensor found under prefix {prefix!r} for source {source!r} "
            f"({len(state)} keys, e.g. {list(state)[:3]}){hint}"
        )
    block, counts = infer_structure(d2_state)
    depth = _DEPTHS.get((block, counts))
    if depth is None:
        raise IncompleteBackboneError(
            f"cannot infer the ResNet depth: {block} blocks with {counts} blocks in res2..res5 "
            f"match none of {sorted(set(_DEPTHS.values()))}; is part of the network missing?"
        )
    if expected_depth is not None and depth != expected_depth:
        raise ValueError(f"expected a ResNet-{expected_depth}, found a ResNet-{depth}")
    missing = [n for n in expected_names(d2_state, block, counts) if n not in d2_state]
    if missing:

        def _in_source(n: str) -> str:
            return prefix + (n if source == "virtex_d2" else d2_to_torchvision_name(n))

        listing = "\n".join(f"  {n}  (source name: {_in_source(n)})" for n in missing)
        raise IncompleteBackboneError(
            f"ResNet-{depth} backbone is incomplete: {len(missing)} tensor(s) missing:\n{listing}",
            missing,
        )
    # Keys under the ResNet prefix that are not ResNet tensors (other than a classifier) hint at
    # an architecture variant this converter does not know (e.g. conv biases): say so loudly.
    odd = [k for k in unused if k.startswith(prefix) and not k[len(prefix) :].startswith("fc.")]
    notes = [f"{len(odd)} key(s) under {prefix!r} not converted: {odd[:5]}"] if odd else []
    return ConversionResult(
        source=source,
        d2_state=d2_state,
        renamed=renamed,
        unused_keys=unused,
        dropped_keys=dropped,
        depth=depth,
        block=block,
        notes=notes,
        **shape_of(d2_state, block),
    )


def convert_checkpoint(
    state_or_path: str | Mapping[str, Any],
    source: str,
    *,
    prefix: str | None = None,
    expected_depth: int | None = None,
    progress: bool = False,
) -> ConversionResult:
    """Convert a checkpoint file, a loaded checkpoint or a bare state dict.

    ``source`` is one of :data:`SOURCES`, or "auto" to recognise the layout (:func:`detect_source`).

    Files are read with :func:`load_any_checkpoint` (weights only); wrappers are removed with
    :func:`extract_state_dict`. See :func:`convert_state_dict` for the other arguments.
    """
    checkpoint = (
        load_any_checkpoint(state_or_path) if isinstance(state_or_path, str) else state_or_path
    )
    state = extract_state_dict(checkpoint)
    return convert_state_dict(
        state, source, prefix=prefix, expected_depth=expected_depth, progress=progress
    )
