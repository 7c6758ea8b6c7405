"""Pretraining end to end: configs, train_net.py, overfitting, multi-process, resume."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import REPO, load_config, tiny_run_opts

VIRTEX_CONFIGS = sorted(
    glob.glob(str(REPO / "configs" / "pretrain" / "*.yaml"))
    + [
        p
        for p in glob.glob(str(REPO / "configs" / "synthetic" / "*.yaml"))
        if any(
            t in os.path.basename(p)
            for t in ("captioning", "masked_lm", "classification_R", "VirTex")
        )
    ]
)


@pytest.mark.parametrize("path", VIRTEX_CONFIGS, ids=os.path.basename)
def test_every_pretraining_config_merges_and_builds(path):
    cfg = load_config(path, "MODEL.DEVICE", "cpu")
    assert cfg.MODEL.META_ARCHITECTURE == "VirTex"
    # The vocabulary files are data; the architecture must build without them.
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    t = cfg.MODEL.VIRTEX.TEXTUAL_HEAD
    if model.textual_head is not None:
        assert len(model.textual_head.transformer.layers) == t.NUM_LAYERS
        assert model.textual_head.hidden_size == t.HIDDEN_SIZE
    del model


def small_opts(synthetic, out_dir, iters=4, batch=4):
    return [
        *tiny_run_opts(synthetic, out_dir, iters=iters, batch=batch),
        "MODEL.VIRTEX.DECODER.BEAM_SIZE",
        "2",
        "MODEL.VIRTEX.DECODER.MAX_LENGTH",
        "8",
        "INPUT.VIRTEX.TEST_RESIZE",
        "64",
        "INPUT.VIRTEX.TEST_CROP_SIZE",
        "64",
    ]


def run_train_net(synthetic, *args):
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic["root"]))
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train_net.py"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_train_net_pretrains_checkpoints_and_evaluates_captions(synthetic, tmp_path):
    config = str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml")
    log = run_train_net(synthetic, "--config-file", config, *small_opts(synthetic, tmp_path))
    assert "loss_caption_forward" in log and "loss_caption_backward" in log
    metrics = [json.loads(line) for line in (tmp_path / "metrics.json").read_text().splitlines()]
    assert any("loss_caption_backward" in m for m in metrics)
    final = tmp_path / "model_final.pth"
    ckpt = torch.load(final, weights_only=True)
    assert "backbone.res5.1.conv2.weight" in ckpt["model"] and ckpt["iteration"] == 3
    assert (tmp_path / "last_checkpoint").read_text().strip() == "model_final.pth"
    assert list((tmp_path).glob("events.out.tfevents.*"))

    log = run_train_net(
        synthetic,
        "--config-file",
        config,
        "--eval-only",
        *small_opts(synthetic, tmp_path / "eval"),
        "MODEL.WEIGHTS",
        str(final),
    )
    assert "CIDEr" in log and "BLEU-4" in log and "ROUGE-L" in log
    results = json.loads(
        (
            tmp_path / "eval" / "inference" / "synthetic_captions_val" / "captions_results.json"
        ).read_text()
    )
    assert len(results) == 8 and all(isinstance(r["caption"], str) for r in results)


def test_model_overfits_eight_images(synthetic):
    from detectron2.data import DatasetCatalog

    from virtex_d2.data.caption_mapper import CaptionDatasetMapper

    torch.manual_seed(0)
    cfg = load_config(
        str(REPO / "configs" / "synthetic" / "captioning_R_18.yaml"),
        *small_opts(synthetic, "/nonexistent"),
    )
    cfg.MODEL.VIRTEX.TEXTUAL_HEAD.DROPOUT = 0.0
    mapper = CaptionDatasetMapper(cfg, is_train=False)  # fixed crops and captions
    batch = [mapper(r) for r in DatasetCatalog.get("synthetic_captions_train")[:8]]
    model = build_model(cfg)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    with EventStorage():
        for _ in range(80):
            loss = model(batch)["loss_caption_forward"]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]


def _ddp_worker(opts, out_dir):
    from detectron2.utils import comm

    from virtex_d2.engine.trainer import Trainer

    cfg = load_config(str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml"), *opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    torch.save(
        {k: v for k, v in model.state_dict().items()},
        os.path.join(out_dir, f"rank{comm.get_rank()}.pt"),
    )
    assert comm.get_world_size() == 2 and comm.get_local_size() == 2


def test_two_process_gloo_training_keeps_ranks_identical(synthetic, tmp_path):
    from virtex_d2.engine.launch import launch

    opts = small_opts(synthetic, tmp_path, iters=3, batch=4)
    launch(_ddp_worker, 2, args=(opts, str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    start = build_model(
        load_config(str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml"), *opts)
    ).state_dict()
    params = [k for k in r0 if "running_" not in k and "num_batches" not in k]
    assert all(torch.equal(r0[k], r1[k]) for k in params)
    # ... and training did move them.
    assert any(not torch.equal(r0[k], start[k]) for k in params if k in start)


class _LRRecorder:
    def __init__(self):
        self.lrs = {}

    def hook(self, trainer):
        from detectron2.engine import HookBase

        rec = self

        class Hook(HookBase):
            def before_step(self):
                rec.lrs[self.trainer.iter] = self.trainer.optimizer.param_groups[0]["lr"]

        return Hook()


def test_resume_continues_at_the_next_iteration_with_its_learning_rate(synthetic, tmp_path):
    from virtex_d2.engine.trainer import Trainer

    config = str(REPO / "configs" / "synthetic" / "captioning_R_18.yaml")
    full = _LRRecorder()
    cfg = load_config(config, *small_opts(synthetic, tmp_path / "full", iters=6))
    t = Trainer(cfg)
    t.register_hooks([full.hook(t)])
    t.train()
    assert (tmp_path / "full" / "model_0000003.pth").exists()

    # Resume from the checkpoint written after iteration 3, as after an interruption there.
    (tmp_path / "full" / "last_checkpoint").write_text("model_0000003.pth")
    resumed = _LRRecorder()
    t2 = Trainer(cfg)
    t2.resume_or_load(resume=True)
    assert t2.start_iter == 4
    t2.register_hooks([resumed.hook(t2)])
    t2.train()
    assert sorted(resumed.lrs) == [4, 5]
    for it in (4, 5):
        assert resumed.lrs[it] == pytest.approx(full.lrs[it], rel=1e-9)
    assert full.lrs[4] != full.lrs[5]  # the schedule moves, so a wrong resume point shows
