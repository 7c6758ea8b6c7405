#!/usr/bin/env python
"""Show where a VirTex captioning model looks while it writes each word of a caption.

    python tools/visualize_attention.py --config-file F --weights model_final.pth \\
        --input photo.jpg --output attention/ [--decoder greedy] [--layer -1]

The image is loaded upright (EXIF), resized and centre-cropped as in evaluation, and captioned.
The textual head is then re-run on the caption (teacher forcing; causal masking makes this the
exact attention used while decoding). Its cross-attention over the h x w visual grid is
combined as the MEAN OVER HEADS, THEN THE MEAN OVER LAYERS (--layer K shows layer K alone);
sub-word tokens of one word are averaged. Each word's map is upsampled bilinearly to the crop,
scaled to [0, 1] per word, coloured and alpha-blended over the image.

Writes DIR/NN_word.png (one per word, NN = word index from 00) and DIR/caption_sheet.png (the
input crop followed by every word's panel, in a grid). Prints the caption and the paths.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from virtex_d2.config import setup_cfg
from virtex_d2.data.image_io import UnreadableImageError, load_image_rgb
from virtex_d2.engine.predictor import CaptionPredictor
from virtex_d2.engine.tool_args import model_load_errors, model_tool_parser

# Figures are laid out in pixels at 64 dpi so that every size is an exact number of inches
# (a power-of-two dpi), and saved PNGs have exactly the sizes below.
DPI = 64
TITLE_PX = 32  # band above each panel holding its word
HEADER_PX = 64  # band above the contact sheet holding the whole caption


def overlay_attention(
    image: np.ndarray, attention: torch.Tensor, alpha: float = 0.5, cmap: str = "jet"
) -> np.ndarray:
    """Blend a coloured attention map over an image.

    image: (H, W, 3) uint8; attention: (h, w) grid, upsampled bilinearly to (H, W) and scaled
    to [0, 1] (a constant map shows as the colormap's lowest colour). Returns (H, W, 3) uint8.
    """
    import matplotlib

    size = image.shape[:2]
    up = F.interpolate(
        attention[None, None].float(), size=size, mode="bilinear", align_corners=False
    )[0, 0]
    lo, hi = up.min(), up.max()
    norm = (up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up)
    colours = matplotlib.colormaps[cmap](norm.numpy())[..., :3]
    blended = (1 - alpha) * image.astype(np.float64) / 255.0 + alpha * colours
    return (blended * 255).round().clip(0, 255).astype(np.uint8)


def _figure(width_px: int, height_px: int):
    # A bare Figure renders with Agg on savefig and never touches pyplot's global state.
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI)


def _panel(fig, image: np.ndarray, title: str, left: int, top: int, panel_px: int) -> None:
    """Draw ``image`` with ``title`` above it; left/top in pixels from the figure's top left."""
    w, h = fig.get_size_inches() * DPI
    ax = fig.add_axes([left / w, 1 - (top + TITLE_PX + panel_px) / h, panel_px / w, panel_px / h])
    ax.imshow(image, interpolation="bilinear")
    ax.set_axis_off()
    fig.text(
        (left + panel_px / 2) / w,
        1 - (top + TITLE_PX / 2) / h,
        title,
        ha="center",
        va="center",
        fontsize=16,
    )


def save_word_figure(path: str, image: np.ndarray, word: str, panel_px: int = 256) -> None:
    """One panel: ``image`` (an overlay) under the title ``word``; PNG of panel x (panel+title)."""
    fig = _figure(panel_px, panel_px + TITLE_PX)
    _panel(fig, image, word, 0, 0, panel_px)
    fig.savefig(path, dpi=DPI)


def save_caption_sheet(
    path: str,
    image: np.ndarray,
    overlays: Sequence[np.ndarray],
    words: Sequence[str],
    caption: str,
    panel_px: int = 256,
    columns: int = 4,
) -> tuple[int, int]:
    """The input crop then one panel per word, ``columns`` per row, under the caption.

    Returns the PNG's (width, height): (min(n+1, columns) * panel_px,
    HEADER_PX + rows * (panel_px + TITLE_PX)) with n words and rows = ceil((n+1) / columns).
    """
    panels = [(image, "input")] + list(zip(overlays, words))
    cols = min(len(panels), columns)
    rows = math.ceil(len(panels) / cols)
    width, height = cols * panel_px, HEADER_PX + rows * (panel_px + TITLE_PX)
    fig = _figure(width, height)
    # ~0.55 em per character at 16 pt (21 px at 64 dpi).
    text = "\n".join(textwrap.wrap(caption or "(empty caption)", max(10, int(width / 12))))
    fig.text(
        0.5,
        1 - HEADER_PX / 2 / height,
        text,
        ha="center",
        va="center",
        fontsize=16,
        fontweight="bold",
    )
    for i, (panel, title) in enumerate(panels):
        r, c = divmod(i, cols)
        _panel(fig, panel, title, c * panel_px, HEADER_PX + r * (panel_px + TITLE_PX), panel_px)
    fig.savefig(path, dpi=DPI)
    return width, height


def safe_filename(word: str, limit: int = 40) -> str:
    """An ASCII file-name stem for ``word`` ("don't" -> "don_t"); "word" if nothing is left."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", word).strip("_")[:limit]
    return stem or "word"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_tool_parser(__doc__, "one image file", "directory for the PNGs")
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="show only this textual-head layer (0-based, -1 = last); default: mean of layers",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="opacity of the attention colours")
    parser.add_argument("--cmap", default="jet", help="matplotlib colormap name")
    parser.add_argument("--panel-size", type=int, default=256, help="panel side in pixels")
    parser.add_argument("--columns", type=int, default=4, help="panels per contact-sheet row")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE pairs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if not 0.0 <= args.alpha <= 1.0:
            raise ValueError(f"--alpha must be in [0, 1], got {args.alpha}")
        if args.panel_size < 16 or args.columns < 1:
            raise ValueError("--panel-size must be >= 16 and --columns >= 1")
        import matplotlib

        if args.cmap not in matplotlib.colormaps:
            raise ValueError(f"--cmap {args.cmap!r} is not a matplotlib colormap")
        image = load_image_rgb(args.input)
        cfg = setup_cfg(args.config_file, args.opts)
        predictor = CaptionPredictor(cfg, args.weights)
        crop = predictor.prepare(image)
        result = predictor.attention(crop, decoder=args.decoder, layer=args.layer)
    except (UnreadableImageError, *model_load_errors()) as e:
        print(f"visualize_attention: error: {e}", file=sys.stderr)
        return 1
    crop_np = crop.permute(1, 2, 0).numpy()
    os.makedirs(args.output, exist_ok=True)
    print(f"caption: {result.caption}")
    overlays = []
    for i, (word, attention) in enumerate(zip(result.words, result.word_maps)):
        overlays.append(overlay_attention(crop_np, attention, args.alpha, args.cmap))
        path = os.path.join(args.output, f"{i:02d}_{safe_filename(word)}.png")
        save_word_figure(path, overlays[-1], word, args.panel_size)
        print(f"wrote {path}")
    sheet = os.path.join(args.output, "caption_sheet.png")
    save_caption_sheet(
        sheet, crop_np, overlays, result.words, result.caption, args.panel_size, args.columns
    )
    print(f"wrote {sheet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
