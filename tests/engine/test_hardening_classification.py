"""Classification trains through the same loader as pretraining and detection: a SIGKILLed run
resumes to the weights of an uninterrupted one, and an unreadable image is skipped and counted
under DATALOADER.VIRTEX_MAX_BAD_FRACTION (README "Failure behaviour")."""

from __future__ import annotations

import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import DatasetMapper
from helpers import REPO, assert_same_final_state, kill_train_net_midway, training_env
from PIL import Image

import virtex_d2
from virtex_d2.data.classification_mapper import ClassificationDatasetMapper
from virtex_d2.data.datasets import register_image_folder
from virtex_d2.data.resumable import ResumableTrainLoader
from virtex_d2.data.validation import BadDataError
from virtex_d2.engine.trainer import DEFAULT_TASK, TASKS, Trainer, task_spec

FINETUNE = str(REPO / "configs" / "synthetic" / "finetune_R_18.yaml")
LINEAR = str(REPO / "configs" / "synthetic" / "linear_probe_R_18.yaml")
ITERS, KILL_AFTER = 8, 4  # checkpoints after iterations 1, 3, 5, 7: killed between 3 and 5


def opts(out):
    # Fine-tuning, so the backbone's momentum and BN statistics must resume exactly too; random
    # crops and flips stay on. A step inside the run puts the scheduler in the comparison.
    return [
        "INPUT.CLASSIFICATION.TRAIN_CROP_SIZE", "48", "INPUT.CLASSIFICATION.TEST_RESIZE", "48",
        "INPUT.CLASSIFICATION.TEST_CROP_SIZE", "48",
        "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(ITERS), "SOLVER.STEPS", "(5,)",
        "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "2", "DATASETS.TEST", "()",
        "OUTPUT_DIR", str(out), "SEED", "11",
    ]  # fmt: skip


def train_net(synthetic, out, *extra):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), "--config-file", FINETUNE, *extra,
         *opts(out)],
        cwd=REPO, env=training_env(synthetic), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_sigkilled_classification_run_resumes_to_the_same_weights(synthetic, tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    train_net(synthetic, full)

    kill_train_net_midway(FINETUNE, opts(broken), broken, synthetic, KILL_AFTER)
    assert (broken / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not (broken / "model_final.pth").exists()

    log = train_net(synthetic, broken, "--resume")
    assert "Starting training from iteration 4" in log

    final = assert_same_final_state(full, broken, ITERS, ("momentum_buffer",))
    # ... and it was not trivially equal: backbone and classifier moved after the checkpoint.
    mid = torch.load(broken / "model_0000003.pth", weights_only=True)["model"]
    assert sum(not torch.equal(mid[k], final[k]) for k in mid) > len(mid) // 2
    assert not torch.equal(mid["classifier.weight"], final["classifier.weight"])


# ------------------------------------------------------------------------------- bad images
def folder_with_a_corrupt_image(root, per_class: int = 4):
    """Three colour classes of 32 px images, and one non-empty file that is not an image (so it
    passes the pre-training stat check and fails only when decoded)."""
    rng = np.random.default_rng(0)
    colours = {"blue": (30, 60, 220), "green": (30, 170, 50), "red": (220, 30, 30)}
    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(colour, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    corrupt = root / "red" / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return corrupt


def folder_cfg(root, tmp_path, *extra):
    name = f"corrupt_{uuid.uuid4().hex[:8]}"
    register_image_folder(name, str(root))
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(LINEAR)
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu", "MODEL.CLASSIFIER.NUM_CLASSES", 3,
        "DATASETS.TRAIN", (name,), "DATASETS.TEST", (),
        "INPUT.CLASSIFICATION.TRAIN_CROP_SIZE", 32, "DATALOADER.NUM_WORKERS", 0,
        # 13 records: one batch is a whole epoch, so the corrupt file is drawn at iteration 0.
        "SOLVER.IMS_PER_BATCH", 13, "SOLVER.MAX_ITER", 2, "SOLVER.CHECKPOINT_PERIOD", 100,
        "OUTPUT_DIR", str(tmp_path / "out"), "SEED", 3, *extra,
    ])  # fmt: skip
    return cfg


def test_folder_with_a_corrupt_image_trains_and_counts_it(tmp_path):
    corrupt = folder_with_a_corrupt_image(tmp_path / "folder")
    cfg = folder_cfg(tmp_path / "folder", tmp_path, "DATALOADER.VIRTEX_MAX_BAD_FRACTION", 0.1)
    trainer = Trainer(cfg)
    loader = trainer._trainer.data_loader
    assert isinstance(loader, ResumableTrainLoader)
    assert isinstance(loader.mapper, ClassificationDatasetMapper)
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert len(trainer.storage.history("total_loss").values()) == 2
    assert list(loader.tracker.bad) == [str(corrupt)]
    assert "UnreadableImageError" in loader.tracker.bad[str(corrupt)]
    assert loader.state_dict()["bad_files"] == [str(corrupt)]  # goes into checkpoints

    strict = folder_cfg(tmp_path / "folder", tmp_path, "DATALOADER.VIRTEX_MAX_BAD_FRACTION", 0.0)
    trainer = Trainer(strict)
    trainer.resume_or_load(resume=False)
    with pytest.raises(BadDataError, match="corrupt.png"):
        trainer.train()


def test_one_table_picks_mappers_and_optimizers():
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
    assert task_spec(cfg) is DEFAULT_TASK
    assert DEFAULT_TASK.train_mapper is DatasetMapper and DEFAULT_TASK.test_mapper is DatasetMapper
    assert TASKS["ImageClassifier"].train_mapper is ClassificationDatasetMapper
    assert TASKS["VirTex"].streams_shards and not TASKS["ImageClassifier"].streams_shards
