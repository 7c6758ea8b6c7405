#!/usr/bin/env python
"""
Score caption results against COCO-format caption ground truth with the official toolkit.

    python tools/eval_captions.py --gt captions_val2017.json --results results.json \
        [--json scores.json] [--subset] [--metrics BLEU-4 CIDEr]

--gt:      COCO Captions json: {"images": [{"id": ..}, ..], "annotations": [{"image_id": ..,
           "caption": ..}, ..]}. Image ids may be ints or strings.
--results: [{"image_id": .., "caption": ..}, ..], one caption per image.
Scores are printed in percent (toolkit value x 100) and optionally written as json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Hashable

from virtex_d2.evaluation.caption_metrics import (
    METRIC_NAMES,
    CaptionScores,
    JavaNotFoundError,
    score_captions,
)


def load_coco_captions(path: str) -> dict[Hashable, list[str]]:
    """image id -> reference captions, images in file order, captions in annotation order."""
    with open(path) as f:
        data = json.load(f)
    gts: dict[Hashable, list[str]] = {}
    # COCOEvalCap scores images in the order of "images"; keep it so numbers match exactly.
    for image in data.get("images", []):
        gts[image["id"]] = []
    for ann in data["annotations"]:
        if "images" in data and ann["image_id"] not in gts:
            raise ValueError(f"{path}: annotation for unknown image id {ann['image_id']!r}")
        gts.setdefault(ann["image_id"], []).append(ann["caption"])
    return gts


def load_results(path: str) -> dict[Hashable, str]:
    """image id -> caption from a COCO caption-results json; repeated image ids are an error."""
    with open(path) as f:
        data = json.load(f)
    results: dict[Hashable, str] = {}
    for item in data:
        if item["image_id"] in results:
            raise ValueError(f"{path}: image id {item['image_id']!r} has more than one result")
        results[item["image_id"]] = item["caption"]
    return results


def format_table(result: CaptionScores) -> str:
    lines = [f"{'metric':<10}{'score (%)':>10}", "-" * 20]
    lines += [f"{name:<10}{value:>10.2f}" for name, value in result.scores.items()]
    lines += [f"{name:<10}{'skipped':>10}  ({reason})" for name, reason in result.skipped.items()]
    lines.append(f"{result.num_images} images")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--gt", required=True, help="COCO Captions ground-truth json")
    parser.add_argument("--results", required=True, help="caption results json")
    parser.add_argument("--json", help="write {scores, skipped, num_images} here")
    parser.add_argument("--metrics", nargs="+", choices=METRIC_NAMES, help="default: all")
    parser.add_argument(
        "--subset",
        action="store_true",
        help="score only ground-truth images that have a result (default: all must have one)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    try:
        result = score_captions(
            load_coco_captions(args.gt),
            load_results(args.results),
            metrics=args.metrics,
            allow_subset=args.subset,
        )
    except (ValueError, JavaNotFoundError) as exc:  # bad inputs or no Java: no traceback needed
        print(f"eval_captions: error: {exc}", file=sys.stderr)
        return 1
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_json(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
