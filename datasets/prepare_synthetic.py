#!/usr/bin/env python
"""Generate the synthetic "shapes" dataset (COCO Captions, COCO instances and LVIS v1 json
files plus JPEG images). The registered ``synthetic_*`` datasets read it from
``$DETECTRON2_DATASETS/synthetic`` and generate it there with the defaults when it is
missing; use this script to (re)generate it explicitly or with other sizes.

Example:
    python datasets/prepare_synthetic.py --output datasets/synthetic
"""

from __future__ import annotations

import argparse
import json

from virtex_d2.data.datasets.synthetic import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_NUM_TRAIN,
    DEFAULT_NUM_VAL,
    generate_synthetic_dataset,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory to write (created)")
    parser.add_argument("--num-train", type=int, default=DEFAULT_NUM_TRAIN)
    parser.add_argument("--num-val", type=int, default=DEFAULT_NUM_VAL)
    parser.add_argument("--image-size", type=int, default=DEFAULT_IMAGE_SIZE, help="pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    summary = generate_synthetic_dataset(
        args.output, args.num_train, args.num_val, args.image_size, args.seed, progress=True
    )
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
