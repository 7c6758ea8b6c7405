"""Exact resume: a run SIGKILLed between checkpoints and resumed with --resume ends with the same
weights and optimizer state as an uninterrupted run (README "Failure behaviour")."""

from __future__ import annotations

import subprocess
import sys

import torch
from helpers import (
    REPO,
    assert_same_final_state,
    kill_train_net_midway,
    tiny_run_opts,
    training_env,
)

CONFIG = str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml")
ITERS, KILL_AFTER = 8, 4  # checkpoints after iterations 1, 3, 5, 7: killed between 3 and 5


def opts(synthetic, out):
    # 48 px: random crops, flips and colour jitter stay on.
    run = tiny_run_opts(synthetic, out, iters=ITERS, crop=48, warmup=3, workers=2, seed=11)
    return [*run, "DATASETS.TEST", "()"]


def train_net(synthetic, out, *extra):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config-file",
            CONFIG,
            *extra,
            *opts(synthetic, out),
        ],
        cwd=REPO,
        env=training_env(synthetic),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_sigkilled_run_resumes_to_the_same_weights(synthetic, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    train_net(synthetic, full)

    kill_train_net_midway(CONFIG, opts(synthetic, broken), broken, synthetic, KILL_AFTER)
    assert (broken / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (broken / "model_final.pth").exists()

    log = train_net(synthetic, broken, "--resume")
    assert "Starting training from iteration 4" in log

    final = assert_same_final_state(full, broken, ITERS, ("momentum_buffer", "lookahead_slow"))
    # ... and it was not trivially equal: these weights moved from the checkpoint resumed from.
    mid = torch.load(broken / "model_0000003.pth", weights_only=True)["model"]
    assert sum(not torch.equal(mid[k], final[k]) for k in mid) > len(mid) // 2
