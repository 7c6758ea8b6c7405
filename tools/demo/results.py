"""Reading a stage's metrics.json, and the demo's ``results.json`` (means over seeds)."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable

from virtex_d2.io import atomic_write_text

# results.json keys per init: (dataset, task, metric in Detectron2's results).
# lvis_AP is LVIS's headline metric, mask AP; the box AP and the frequency tiers come along.
METRICS = {
    "coco_bbox_AP": ("coco", "bbox", "AP"),
    "coco_segm_AP": ("coco", "segm", "AP"),
    "lvis_AP": ("lvis", "segm", "AP"),
    "lvis_APr": ("lvis", "segm", "APr"),
    "lvis_APc": ("lvis", "segm", "APc"),
    "lvis_APf": ("lvis", "segm", "APf"),
    "lvis_bbox_AP": ("lvis", "bbox", "AP"),
}


def read_metrics(path: str) -> list[dict]:
    """The records of a Detectron2 metrics.json (one json per line; a torn last line of an
    interrupted run is skipped)."""
    records = []
    if not os.path.isfile(path):
        return records
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
    return records


def final_evaluation(path: str) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` of the last evaluation logged in metrics.json.

    Detectron2's EvalHook stores the flattened results ("bbox/AP", "captioning/CIDEr") in the
    event storage after training, which the JSON writer appends to metrics.json.
    """
    for record in reversed(read_metrics(path)):
        evaluated = {k: v for k, v in record.items() if "/" in k and k.count("/") == 1}
        if evaluated:
            out: dict[str, dict[str, float]] = {}
            for key, value in evaluated.items():
                task, metric = key.split("/")
                out.setdefault(task, {})[metric] = value
            return out
    return {}


def loss_curve(path: str, key: str = "total_loss") -> list[tuple]:
    """(iteration, value) pairs; after a resume the re-logged iterations keep the last value."""
    points = {}
    for record in read_metrics(path):
        if key in record and "iteration" in record:
            points[record["iteration"]] = record[key]
    return sorted(points.items())


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    return sum(vals) / len(vals) if vals else None


def init_metrics(per_dataset: dict[str, dict]) -> dict[str, float | None]:
    """results.json metrics of one init and seed from ``{dataset: stage results}``."""
    out = {}
    for name, (dataset, task, metric) in METRICS.items():
        if dataset in per_dataset:
            out[name] = per_dataset[dataset].get(task, {}).get(metric)
    return out


def aggregate(per_seed: dict[int, dict[str, dict[str, dict]]]) -> dict:
    """``per_seed[seed][init][dataset]`` = stage results -> the results.json payload:
    ``{init: {metric: mean over seeds}, "seeds": [{"seed", init: {metric: value}}]}``."""
    seeds = []
    for seed in sorted(per_seed):
        entry: dict[str, object] = {"seed": seed}
        for init, datasets in per_seed[seed].items():
            entry[init] = init_metrics(datasets)
        seeds.append(entry)
    payload: dict[str, object] = {}
    inits = sorted({i for s in per_seed.values() for i in s}, key=lambda i: i != "virtex")
    for init in inits:
        names = sorted({k for s in seeds for k in s.get(init, {})}, key=list(METRICS).index)
        payload[init] = {n: _mean(s.get(init, {}).get(n) for s in seeds) for n in names}
    payload["seeds"] = seeds
    return payload


def write_results(path: str, payload: dict) -> None:
    atomic_write_text(path, json.dumps(payload, indent=2))
