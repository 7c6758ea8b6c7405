#!/usr/bin/env python
"""Turn a pretrained ResNet into a Detectron2 backbone checkpoint (``MODEL.WEIGHTS``), or (with
``--to torchvision``) a VirTex / Detectron2 backbone into a torchvision ResNet state dict.

Examples::

    # our VirTex pretraining run (Detectron2 checkpointer output)
    python tools/convert_to_d2.py --source virtex_d2 output/virtex/model_final.pth \\
        output/virtex_R_50_d2.pth
    # a checkpoint of the reference VirTex code
    python tools/convert_to_d2.py --source virtex bicaptioning_R_50_L1_H2048.pth out.pth
    # torchvision's ImageNet ResNet-50 (IMAGENET1K_V1 weights)
    python tools/convert_to_d2.py --source torchvision resnet50-0676ba61.pth \\
        output/torchvision_R_50_d2.pth
    # the reverse: a VirTex checkpoint (or converted backbone) -> torchvision ResNet weights,
    # for torchvision.models.resnet50().load_state_dict(sd, strict=False) (only fc missing)
    python tools/convert_to_d2.py --to torchvision output/virtex/model_final.pth r50_tv.pth

The work is done by :mod:`virtex_d2.checkpoint.convert`; this file only parses arguments and
prints. Exit status 1 (and nothing written) when the backbone is incomplete.
"""

from __future__ import annotations

import argparse
import sys

from virtex_d2.checkpoint.convert import (
    SOURCES,
    IncompleteBackboneError,
    convert_checkpoint,
    save_d2_checkpoint,
)
from virtex_d2.checkpoint.to_torchvision import (
    d2_to_torchvision_state,
    save_torchvision_state,
    torchvision_arch,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        default="auto",
        choices=("auto", *SOURCES),
        help="input layout (default: recognised from the tensor names)",
    )
    parser.add_argument(
        "--to",
        default="detectron2",
        choices=("detectron2", "torchvision"),
        help="output layout (default detectron2)",
    )
    parser.add_argument("input", help="checkpoint to convert (.pth; .pkl is refused)")
    parser.add_argument("output", help="where to write the converted checkpoint (.pth)")
    parser.add_argument(
        "--prefix",
        default=None,
        help="where the ResNet lives in the input state dict (default: 'backbone.' for "
        "virtex_d2, 'visual.cnn.' for virtex, '' for torchvision)",
    )
    parser.add_argument(
        "--depth", type=int, default=None, help="refuse unless the network has this depth"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = convert_checkpoint(
            args.input, args.source, prefix=args.prefix, expected_depth=args.depth, progress=True
        )
    except IncompleteBackboneError as e:
        print(f"error: {e}\nnothing written.", file=sys.stderr)
        return 1
    print(result.summary())
    if result.unused_keys:
        print("unused keys:")
        for key in result.unused_keys:
            print(f"  {key}")
    if args.to == "torchvision":
        try:
            arch = torchvision_arch(result)
        except ValueError as e:
            print(f"error: {e}\nnothing written.", file=sys.stderr)
            return 1
        state = d2_to_torchvision_state(result.d2_state)
        save_torchvision_state(state, args.output)
        print(
            f"wrote {len(state)} tensors to {args.output}: load with "
            f"torchvision.models.{arch}().load_state_dict(torch.load(path, weights_only=True), "
            "strict=False) (only fc.weight/fc.bias missing)"
        )
        return 0
    save_d2_checkpoint(result, args.output)
    print(f"wrote {len(result.d2_state)} tensors to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
