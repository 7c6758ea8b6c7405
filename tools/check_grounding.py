#!/usr/bin/env python
"""Measure whether a VirTex captioning model uses the image: caption loss with the right images
versus with the images shuffled between captions, and the number of distinct captions.

    python tools/check_grounding.py --config-file configs/synthetic/bicaptioning_R_18.yaml \\
        --weights output/synthetic/bicaptioning_R_18/model_final.pth \\
        [--dataset synthetic_captions_val] [--num-images 48] [--batch-size 16] [--json OUT]

Uses the dataset's first caption per image and the config's evaluation transform. Prints the
forward-direction cross-entropy in nats per token with matched images ("loss") and with every
caption paired with another image of its batch ("shuffled"); their difference ("gap") is ~0
for a captioner that ignores the image. Also prints how many distinct greedy captions the
images get. Exit status 1 on a bad config, weights file or dataset.
"""

from __future__ import annotations

import argparse
import json
import sys

from virtex_d2.config import setup_cfg
from virtex_d2.engine.predictor import CaptionPredictor
from virtex_d2.engine.tool_args import model_load_errors
from virtex_d2.evaluation.grounding import grounding_batches, measure_grounding


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, help="the model's training config")
    parser.add_argument("--weights", required=True, help="Detectron2 checkpoint (.pth)")
    parser.add_argument("--dataset", help="registered caption dataset (default: DATASETS.TEST[0])")
    parser.add_argument("--num-images", type=int, default=48, help="first N images of it")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (>= 2)")
    parser.add_argument("--json", help="also write the numbers here")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = setup_cfg(args.config_file, args.opts)
        model = CaptionPredictor(cfg, args.weights).model
        name = args.dataset or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None)
        if name is None:
            raise ValueError("the config has no DATASETS.TEST; pass --dataset")
        batches = grounding_batches(cfg, name, args.num_images, args.batch_size)
        report = measure_grounding(model, batches, progress=True)
    except model_load_errors() as e:
        print(f"check_grounding: error: {e}", file=sys.stderr)
        return 1
    print(f"{name}, {report.num_images} images, nats per caption token (forward direction):")
    print(f"  loss with matched images   {report.loss:.3f}")
    print(f"  loss with shuffled images  {report.shuffled_loss:.3f}")
    print(f"  gap                        {report.gap:+.3f}   (~0: the captioner ignores the image)")
    print(f"  distinct greedy captions   {report.distinct_captions} of {report.num_images}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": name, **report.to_json()}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
