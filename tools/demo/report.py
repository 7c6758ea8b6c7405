"""The comparison table (printed and in report.md) and the markdown report itself."""

from __future__ import annotations

import os

from tabulate import tabulate

from .stages import fmt_seconds

TABLE_METRICS = [
    ("COCO box AP", "coco_bbox_AP"),
    ("COCO mask AP", "coco_segm_AP"),
    ("LVIS AP (mask)", "lvis_AP"),
    ("LVIS APr", "lvis_APr"),
    ("LVIS APc", "lvis_APc"),
    ("LVIS APf", "lvis_APf"),
]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sd(values: list[float | None]) -> float | None:
    """Sample standard deviation over seeds (None with fewer than 2 values)."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2:
        return None
    mean = sum(vals) / len(vals)
    return (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def comparison_table(results: dict, fmt: str = "github") -> str:
    """Rows: metrics; columns: VirTex, random (mean and sample s.d. over seeds), difference of
    the means, per-seed values."""
    rows = []
    seeds = results.get("seeds", [])
    for label, key in TABLE_METRICS:
        v, r = results.get("virtex", {}).get(key), results.get("random", {}).get(key)
        if v is None and r is None:
            continue
        diff = None if v is None or r is None else v - r
        per_seed = "; ".join(
            f"{_fmt(s.get('virtex', {}).get(key))} vs {_fmt(s.get('random', {}).get(key))}"
            for s in seeds
        )
        spread = [_sd([s.get(i, {}).get(key) for s in seeds]) for i in ("virtex", "random")]
        cells = [
            _fmt(m) + (f" ± {_fmt(sd)}" if sd is not None else "") for m, sd in zip((v, r), spread)
        ]
        rows.append([label, *cells, ("+" if (diff or 0) >= 0 else "") + _fmt(diff), per_seed])
    headers = [
        "metric",
        "VirTex init (mean ± s.d.)",
        "random init (mean ± s.d.)",
        "difference",
        "per seed (VirTex vs random)",
    ]
    return tabulate(rows, headers=headers, tablefmt=fmt, disable_numparse=True)


def ablation_table(ablation: dict[str, dict], fmt: str = "github") -> str:
    rows = [
        [
            task,
            _fmt(m.get("coco_bbox_AP")),
            _fmt(m.get("coco_segm_AP")),
            _fmt(m.get("caption_CIDEr")),
        ]
        for task, m in ablation.items()
    ]
    return tabulate(
        rows,
        headers=["pretraining task", "COCO box AP", "COCO mask AP", "val CIDEr"],
        tablefmt=fmt,
        disable_numparse=True,
    )


def timing_table(stages: list[dict], fmt: str = "github") -> str:
    rows = [
        [
            s["name"],
            fmt_seconds(s["seconds"]),
            f"{s['cpu_seconds']:.0f}",
            "reused" if s.get("reused") else ("resumed" if s.get("resumed") else ""),
        ]
        for s in stages
    ]
    return tabulate(rows, headers=["stage", "wall", "CPU s", ""], tablefmt=fmt)


def write_report(
    path: str,
    *,
    results: dict,
    command: str,
    mode: str,
    machine: str,
    stages: list[dict],
    total_seconds: float,
    captions: list[dict],
    caption_metrics: dict,
    figures: dict[str, str],
    schedule_note: str,
    ablation: dict[str, dict] | None = None,
    grounding: dict | None = None,
) -> None:
    """Write report.md next to its figures (paths in ``figures`` are relative to it)."""
    v, r = results.get("virtex", {}), results.get("random", {})
    wins = [
        k
        for k in ("coco_bbox_AP", "coco_segm_AP")
        if v.get(k) is not None and r.get(k) is not None and v[k] > r[k]
    ]
    n = len(results.get("seeds", []))
    reused = sum(st["seconds"] for st in stages if st.get("reused"))
    timing = f"Wall time of this invocation: {fmt_seconds(total_seconds)}."
    if reused:
        timing += (
            f" It reused finished stages, which had taken {fmt_seconds(reused)} of wall "
            "time (summed; parallel stages overlap) when they ran."
        )
    distinct = len({c["caption"] for c in captions})
    verdict = (
        f"VirTex init beats random init on COCO box AP and mask AP (mean of {n} seeds)."
        if len(wins) == 2
        else f"VirTex init does NOT beat random init on both COCO box and mask AP in this run "
        f"(mean of {n} seeds; it wins on: {', '.join(wins) or 'neither'})."
    )
    lines = [
        "# virtex-d2 demo: VirTex pretraining vs random init",
        "",
        f"Command: `{command}` (mode: {mode}). Machine: {machine}. {timing}",
        "",
        "A ResNet-18 is pretrained from scratch by bicaptioning on the synthetic shapes "
        "captions, its backbone converted to a Detectron2 checkpoint, and Mask R-CNN R-18-FPN "
        "fine-tuned from it and from random init with identical configs, seeds and budgets on "
        "synthetic COCO and LVIS. AP values are in percent; means over seeds.",
        "",
        f"**{verdict}**",
        "",
        comparison_table(results),
        "",
        f"![AP per init]({figures['ap']})",
        "",
        "## Training losses",
        "",
        f"![training losses]({figures['losses']})",
        "",
        "## Captions of validation images (pretrained model, beam search)",
        "",
    ]
    if caption_metrics:
        lines += [
            "Caption metrics on synthetic_captions_val: "
            + ", ".join(f"{k} {val:.3f}" for k, val in sorted(caption_metrics.items())),
            "",
        ]
    if grounding:
        lines += [
            f"Grounding (as `tools/check_grounding.py`, {grounding['num_images']} validation "
            f"images): caption loss {grounding['loss']:.3f} nats/token with the right "
            f"images, {grounding['shuffled_loss']:.3f} with the images shuffled between "
            f"captions (gap {grounding['gap']:+.3f}); {grounding['distinct_captions']} "
            "distinct greedy captions.",
            "",
        ]
    blind = grounding is not None and grounding["gap"] < 0.01
    if captions and (blind or distinct <= max(1, len(captions) // 3)):
        lines += [
            f"Note: the captioner has not yet learned to ground its words in the image "
            f"({distinct} distinct caption(s) for {len(captions)} images"
            + ("; the wrong image costs it almost nothing" if blind else "")
            + "), "
            "typical of a very short pretraining, which limits what the backbone "
            "transfers.",
            "",
        ]
    if figures.get("captions"):
        lines += [f"![captions]({figures['captions']})", ""]
    lines += ["| image | generated caption | a reference caption |", "|---|---|---|"]
    lines += [
        f"| {os.path.basename(c['file_name'])} | {c['caption']} | {c['reference']} |"
        for c in captions
    ]
    if ablation:
        lines += [
            "",
            "## Pretraining-task ablation (COCO, same budgets)",
            "",
            ablation_table(ablation),
            "",
            "Random init for reference: "
            f"box AP {_fmt(r.get('coco_bbox_AP'))}, mask AP {_fmt(r.get('coco_segm_AP'))}.",
        ]
    lines += [
        "",
        "## Schedule",
        "",
        schedule_note,
        "",
        "## Stages",
        "",
        timing_table(stages),
        "",
        "CPU s: CPU seconds of the stage's process tree, roughly what it costs on an "
        "idle machine (wall time depends on the load and on parallel stages).",
        "",
    ]
    with open(path, "w") as f:
        f.write("\n".join(lines))
