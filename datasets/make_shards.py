#!/usr/bin/env python
"""Write WebDataset shards from a COCO-format captions file and its image folder.

One sample per image: the image file's bytes as they are (``jpg``/``png``/``webp``, not
re-encoded) and ``json`` = ``{"caption": first caption, "captions": [all captions],
"image_id", "file_name", "width", "height"}``, plus ``txt`` = the first caption, which is what
img2dataset writes. Train on the result with
``DATASETS.TRAIN ("webdataset:OUT/{00000..NNNNN}.tar",)`` (the command prints the exact pattern).

Examples::

    # COCO Captions train2017 (5 captions per image), 1000 images per shard
    python datasets/make_shards.py --captions datasets/coco/annotations/captions_train2017.json \\
        --images datasets/coco/train2017 --output datasets/coco_shards --samples-per-shard 1000
    # the synthetic data (generated with datasets/prepare_synthetic.py --output DIR)
    python datasets/make_shards.py --captions DIR/annotations/captions_train.json \\
        --images DIR/train --output DIR/shards --samples-per-shard 100

Every shard is written to a temporary file and renamed when complete, so an interrupted run
leaves no partial ``.tar`` under a final name. Images that are missing or empty are skipped and
listed; their count is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

from tqdm import tqdm

from virtex_d2.data.datasets.coco_captions import load_coco_captions_json
from virtex_d2.io import atomic_write

EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


def shard_pattern(output: str, num_shards: int) -> str:
    """The brace pattern naming ``num_shards`` shards written to ``output``."""
    if num_shards == 1:
        return os.path.join(output, "00000.tar")
    return os.path.join(output, f"{{00000..{num_shards - 1:05d}}}.tar")


def _sample(record: dict[str, Any]) -> dict[str, Any] | str:
    """The webdataset sample of one caption record, or why it was skipped."""
    path = record["file_name"]
    ext = EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if ext is None:
        return f"extension not one of {sorted(EXTENSIONS)}"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    if not data:
        return "empty file (0 bytes)"
    captions = record["captions"]
    meta = {
        "caption": captions[0],
        "captions": captions,
        "image_id": record["image_id"],
        "file_name": os.path.basename(path),
        "width": record["width"],
        "height": record["height"],
    }
    image_id = record["image_id"]
    # webdataset splits member names at the first dot: keys must not contain one.
    key = f"{image_id:012d}" if isinstance(image_id, int) else str(image_id).replace(".", "_")
    return {
        "__key__": key,
        ext: data,
        "json": json.dumps(meta).encode(),
        "txt": captions[0].encode(),
    }


def _write_shard(path: str, samples: Sequence[dict[str, Any]]) -> None:
    import webdataset as wds

    def write(f) -> None:
        # Fixed mtime: the same inputs give byte-identical shards.
        with wds.TarWriter(f, mtime=0) as writer:
            for sample in samples:
                writer.write(sample)

    atomic_write(path, write)


def make_shards(
    captions: str, images: str, output: str, samples_per_shard: int, progress: bool = True
) -> dict[str, Any]:
    """Write the shards; returns ``{"pattern", "shards", "samples", "captions", "skipped"}``."""
    if samples_per_shard <= 0:
        raise ValueError(f"--samples-per-shard must be positive, got {samples_per_shard}")
    records = load_coco_captions_json(captions, images)
    os.makedirs(output, exist_ok=True)
    skipped: dict[str, str] = {}
    shard, written, num_captions, index = [], 0, 0, 0
    for record in tqdm(records, desc="writing shards", unit="image", disable=not progress):
        sample = _sample(record)
        if isinstance(sample, str):
            skipped[record["file_name"]] = sample
            continue
        shard.append(sample)
        num_captions += len(record["captions"])
        if len(shard) == samples_per_shard:
            _write_shard(os.path.join(output, f"{index:05d}.tar"), shard)
            written, index, shard = written + len(shard), index + 1, []
    if shard:
        _write_shard(os.path.join(output, f"{index:05d}.tar"), shard)
        written, index = written + len(shard), index + 1
    if not written:
        raise ValueError(f"no image of {captions} could be read from {images}; nothing written")
    return {
        "pattern": shard_pattern(output, index),
        "shards": index,
        "samples": written,
        "captions": num_captions,
        "skipped": skipped,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", required=True, help="COCO-format captions json")
    parser.add_argument(
        "--images", required=True, help="folder the json's file_name values are relative to"
    )
    parser.add_argument("--output", required=True, help="folder for the shards (created)")
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="images per shard (default 1000); a run with N processes x W "
        "data-loader workers needs at least N x W shards",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        summary = make_shards(args.captions, args.images, args.output, args.samples_per_shard)
    except (OSError, ValueError) as e:  # a bad json or folder: the message names it
        print(f"error: {e}", file=sys.stderr)
        return 1
    for name, why in list(summary["skipped"].items())[:10]:
        print(f"skipped {name}: {why}", file=sys.stderr)
    print(
        f"wrote {summary['samples']} images ({summary['captions']} captions) in "
        f"{summary['shards']} shard(s); skipped {len(summary['skipped'])} image(s)"
    )
    print(f"train with: DATASETS.TRAIN \"('webdataset:{summary['pattern']}',)\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
