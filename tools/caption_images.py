#!/usr/bin/env python
"""Caption image files with a pretrained VirTex captioning model.

    python tools/caption_images.py --config-file configs/pretrain/bicaptioning_R_50_L1_H2048.yaml \\
        --weights model_final.pth --input photos/ --output preds.json [--decoder greedy] \\
        [--batch-size 32] [MODEL.DEVICE cpu]

--input is a file, a directory (searched recursively for .jpg .jpeg .png .bmp .gif .webp .tif
.tiff in any case, sorted) or a glob pattern (quote it; ``**`` works). Images are loaded upright
(EXIF orientation), transparency is composited on white, 16-bit images are rescaled; then the
config's evaluation resize + centre crop is applied.

A file that cannot be decoded (corrupt, truncated, empty, not an image) is reported with the
reason, listed under "skipped" in the output and does not stop the run. Output json:
{"captions": [{"file_name", "caption"}, ..], "skipped": [{"file_name", "error"}, ..],
"num_captioned", "num_skipped"}. Exit status 0, or 1 when the input matches nothing, the
model cannot be built, or not one image could be captioned (the json is still written then).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from virtex_d2.config import setup_cfg
from virtex_d2.data.image_io import list_image_files
from virtex_d2.engine.predictor import CaptionPredictor
from virtex_d2.engine.tool_args import model_load_errors, model_tool_parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_tool_parser(
        __doc__, "image file, directory or glob pattern", "where to write the json"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=int, default=4, help="threads decoding images (0: main thread)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        files = list_image_files(args.input)
        cfg = setup_cfg(args.config_file, args.opts)
        predictor = CaptionPredictor(cfg, args.weights)
    except model_load_errors() as e:
        print(f"caption_images: error: {e}", file=sys.stderr)
        return 1
    print(f"captioning {len(files)} file(s) from {args.input}")
    with logging_redirect_tqdm():  # skip warnings print above the progress bar, not inside it
        results = predictor.caption_files(
            files,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            decoder=args.decoder,
        )
    out_dir = os.path.dirname(os.path.abspath(args.output))
    os.makedirs(out_dir, exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results.to_json(), f, indent=2)
    n_ok, n_bad = len(results.captions), len(results.skipped)
    note = ' (listed under "skipped")' if n_bad else ""
    print(
        f"captioned {n_ok} image(s), skipped {n_bad} unreadable file(s){note}; wrote {args.output}"
    )
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
