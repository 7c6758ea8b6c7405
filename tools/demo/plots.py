"""The report's figures: training-loss curves, AP per init, validation images with captions."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

Curve = list[tuple[int, float]]
_COLORS = {"virtex": "tab:blue", "random": "tab:orange"}


def plot_losses(pretrain: dict[str, Curve], finetune: dict[str, dict[str, Curve]], path: str):
    """``pretrain``: task -> curve; ``finetune``: dataset -> {"<init>/seed<s>": curve}."""
    panels = 1 + len(finetune)
    fig, axes = plt.subplots(1, panels, figsize=(4.5 * panels, 3.6), squeeze=False)
    ax = axes[0][0]
    for task, curve in pretrain.items():
        if curve:
            ax.plot(*zip(*curve), label=task)
    ax.set(title="pretraining (captioning losses)", xlabel="iteration", ylabel="total loss")
    ax.legend(fontsize=7)
    for ax, (dataset, runs) in zip(axes[0][1:], finetune.items()):
        for name, curve in sorted(runs.items()):
            if curve:
                init = name.split("/")[0]
                style = "-" if name.endswith("seed1") else "--"
                ax.plot(*zip(*curve), style, color=_COLORS.get(init), label=name)
        ax.set(title=f"Mask R-CNN fine-tuning ({dataset})", xlabel="iteration", ylabel="total loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ap_bars(results: dict, metrics: Sequence[str], path: str):
    """Mean AP per init (bars) with each seed's value as a dot."""
    inits = [i for i in ("virtex", "random") if i in results]
    metrics = [m for m in metrics if any(results[i].get(m) is not None for i in inits)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(metrics), 3.6))
    width = 0.8 / max(1, len(inits))
    for j, init in enumerate(inits):
        xs = [k + (j - (len(inits) - 1) / 2) * width for k in range(len(metrics))]
        means = [results[init].get(m) or 0.0 for m in metrics]
        ax.bar(xs, means, width, label=f"{init} init", color=_COLORS.get(init))
        for x, m in zip(xs, metrics):
            seeds = [s[init].get(m) for s in results.get("seeds", []) if init in s]
            ax.plot([x] * len(seeds), [v if v is not None else 0.0 for v in seeds], "k.", ms=5)
    ax.set_xticks(range(len(metrics)))
    ax.set_xticklabels(metrics, rotation=20, fontsize=8)
    ax.set(ylabel="AP (mean over seeds; dots: seeds)", title="VirTex vs random init")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def caption_grid(items: list[dict], path: str, columns: int = 4):
    """``items``: {"file_name", "caption", "reference"} -> images with both captions."""
    from PIL import Image

    rows = (len(items) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(Image.open(item["file_name"]).convert("RGB"))
        text = "\n".join(
            textwrap.wrap("VirTex: " + item["caption"], 34)
            + textwrap.wrap("truth: " + item["reference"], 34)
        )
        ax.set_title(text, fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
