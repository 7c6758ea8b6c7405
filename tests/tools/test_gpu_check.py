"""tools/benchmarks/gpu_check.sh can only be measured on a GPU; its CPU smoke path runs here so
that the script (and the benchmark options it uses) cannot rot."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from helpers import REPO

SCRIPT = REPO / "tools" / "benchmarks" / "gpu_check.sh"


def test_gpu_check_cpu_smoke(synthetic, tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHON=sys.executable, DETECTRON2_DATASETS=str(synthetic["root"]))
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--device", "cpu", "--smoke", str(out)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["device"] == "cpu" and report["smoke"] is True and report["gpu"] is None

    precision = report["pretrain"]["precision"]
    assert precision["amp_dtype"] == "bf16"
    assert precision["fp32"]["images_per_s"] > 0 and precision["bf16"]["images_per_s"] > 0
    assert report["pretrain"]["virtex"]["images_per_s"] > 0
    assert report["pretrain"]["cnn_only"]["gflops_per_image"] > 0

    assert report["decoding"]["identical_tokens"] is True and report["decoding"]["smoke"]

    finetune = report["finetune_mask_rcnn_R_50_FPN"]
    assert finetune["iterations"] == 3  # IterationTimer times from the 3rd on
    assert math.isfinite(finetune["total_loss_last"]) and finetune["s_per_iter_last_window"] > 0
    assert finetune["s_per_iter_overall"] > 0


def test_gpu_check_refuses_unknown_options(tmp_path):
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--devcie", "cpu"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "unknown option --devcie" in proc.stderr
