"""Every tool works on the directory tools/import_reference.py writes (the parity model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import REPO
from reference_fixture import PARITY, rebuild_parity_checkpoint

pytestmark = pytest.mark.skipif(not PARITY.is_dir(), reason=f"{PARITY} not found")

SMALL = [
    "INPUT.VIRTEX.TEST_RESIZE",
    "64",
    "INPUT.VIRTEX.TEST_CROP_SIZE",
    "64",
    "MODEL.VIRTEX.DECODER.MAX_LENGTH",
    "6",
]


def run(tool: str, *args: str, env_root=None) -> str:
    env = dict(os.environ)
    if env_root is not None:
        env["DETECTRON2_DATASETS"] = str(env_root)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / tool), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{tool}: {proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("import_tools")
    ckpt = rebuild_parity_checkpoint(tmp / "reference.pth")
    out = tmp / "imported"
    run(
        "import_reference.py",
        "--checkpoint",
        str(ckpt),
        "--config",
        str(PARITY / "reference_config.yaml"),
        "--vocab",
        str(PARITY / "vocab_200.model"),
        "--output",
        str(out),
    )
    return {"config": str(out / "config.yaml"), "weights": str(out / "model_final.pth")}


def test_visualize_attention_and_check_grounding(imported, synthetic, tmp_path):
    image = str(PARITY / "images_256" / "000000008193.png")
    run(
        "visualize_attention.py",
        "--config-file",
        imported["config"],
        "--weights",
        imported["weights"],
        "--input",
        image,
        "--output",
        str(tmp_path / "att"),
    )
    assert list((tmp_path / "att").rglob("*.png"))
    out = tmp_path / "grounding.json"
    run(
        "check_grounding.py",
        "--config-file",
        imported["config"],
        "--weights",
        imported["weights"],
        "--dataset",
        "synthetic_captions_val",
        "--num-images",
        "4",
        "--batch-size",
        "2",
        "--json",
        str(out),
        *SMALL,
        env_root=synthetic["root"],
    )
    numbers = json.loads(out.read_text())
    assert numbers["loss"] > 0 and numbers["shuffled_loss"] > 0


def test_convert_to_d2_takes_the_imported_weights(imported, tmp_path):
    out = tmp_path / "d2.pth"
    run("convert_to_d2.py", "--source", "virtex_d2", imported["weights"], str(out))
    state = torch.load(out, weights_only=True)["model"]
    ours = torch.load(imported["weights"], weights_only=True)["model"]
    assert torch.equal(state["res5.1.conv2.weight"], ours["backbone.res5.1.conv2.weight"])


def test_train_net_evaluates_and_continues_training(imported, synthetic, tmp_path):
    log = run(
        "train_net.py",
        "--config-file",
        imported["config"],
        "--eval-only",
        "DATASETS.TEST",
        '("synthetic_captions_val",)',
        "OUTPUT_DIR",
        str(tmp_path / "eval"),
        *SMALL,
        env_root=synthetic["root"],
    )
    assert "CIDEr" in log
    run(
        "train_net.py",
        "--config-file",
        imported["config"],
        "DATASETS.TRAIN",
        '("synthetic_captions_train",)',
        "DATASETS.TEST",
        '("synthetic_captions_val",)',
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "2",
        "SOLVER.WARMUP_ITERS",
        "0",
        "SOLVER.AMP.ENABLED",
        "False",
        "INPUT.VIRTEX.CROP_SIZE",
        "64",
        "DATALOADER.NUM_WORKERS",
        "0",
        "TEST.EVAL_PERIOD",
        "0",
        "OUTPUT_DIR",
        str(tmp_path / "train"),
        *SMALL,
        env_root=synthetic["root"],
    )
    before = torch.load(imported["weights"], weights_only=True)["model"]
    after = torch.load(tmp_path / "train" / "model_final.pth", weights_only=True)["model"]
    key = "textual_head.transformer.layers.0.linear1.weight"
    assert not torch.equal(before[key], after[key])  # it trained from the imported weights
    assert (before[key] - after[key]).abs().max() < 1.0


def test_voc07_svm_takes_the_imported_weights(imported, synthetic, tmp_path):
    out = tmp_path / "svm.json"
    run(
        "eval_voc07_svm.py",
        "--config-file",
        str(REPO / "configs" / "synthetic" / "linear_probe_R_18.yaml"),
        "--weights",
        imported["weights"],
        "--weights-source",
        "virtex_d2",
        "--dataset",
        "synthetic_cls_train,synthetic_cls_val",
        "--json",
        str(out),
        "--no-cache",
        "--num-workers",
        "0",
        "--jobs",
        "1",
        "TEST.VOC07_SVM.RESIZE",
        "64",
        "TEST.VOC07_SVM.CROP_SIZE",
        "64",
        env_root=synthetic["root"],
    )
    assert 0 <= json.loads(out.read_text())["mAP"] <= 100
