"""The evaluation benchmarks' LVIS-scale mode (tools/benchmarks/benchmark_lvis.py --lvis-scale).

Kept apart from test_coco_lvis_eval.py (whose helpers it uses) to keep that module's size down.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import REPO, load_tool
from test_coco_lvis_eval import (
    _assert_metrics_equal,
    official_lvis_metrics,
)

from virtex_d2.evaluation.fast_cocoeval import LVIS_METRICS, evaluate_coco_json


def test_benchmark_lvis_scale_mode_small(tmp_path):
    """--lvis-scale at toy size, as a script (its worker runs in a spawned process): the
    synthetic set is LVIS-shaped, evaluated, and the report carries time and peak RSS."""
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "benchmarks" / "benchmark_lvis.py"),
            "--lvis-scale",
            "--num-images",
            "40",
            "--dets-per-image",
            "30",
            "--json",
            str(out),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["num_images"] == 40 and report["num_detections"] == 1200
    assert 0 < report["bbox"]["AP"] < 100 and report["bbox"]["APf"] is not None
    memory = report["inputs_in_memory"]
    assert report["peak_rss_mb"] >= memory["peak_rss_mb"] >= memory["rss_mb_at_start"] > 0
    assert report["eval_seconds"] > 0 and "peak RSS" in proc.stdout


def test_lvis_scale_set_matches_official_lvis_eval(tmp_path, monkeypatch):
    """The LVIS-scale generator's data is valid LVIS: the official evaluator agrees with ours."""
    tool = load_tool("benchmark_lvis")
    gt, results = tool.make_lvis_scale(num_images=30, dets_per_image=40, seed=1)
    ref = official_lvis_metrics(gt, results, "bbox", tmp_path, monkeypatch)
    ours = evaluate_coco_json(gt, results, "bbox", lvis=True)
    _assert_metrics_equal(ours, ref, LVIS_METRICS)
