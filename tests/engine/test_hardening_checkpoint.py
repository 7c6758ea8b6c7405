"""Crash-safe checkpoints, safe and checked loading, bad configs, non-finite losses
(README "Failure behaviour")."""

from __future__ import annotations

import errno
import io
import os
import pickle
import subprocess
import sys

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, HookBase
from detectron2.modeling import build_model
from helpers import REPO, load_config, tiny_run_opts

from virtex_d2.config import ConfigError, add_virtex_config, merge_config_checked
from virtex_d2.engine.checkpoint import (
    CheckpointWriteError,
    UnsafeCheckpointError,
    VirtexCheckpointer,
    WeightsMismatchError,
    build_checkpointer,
)
from virtex_d2.engine.hooks import NonFiniteLossError

CAPTIONING = str(REPO / "configs" / "synthetic" / "captioning_R_18.yaml")
MASK_RCNN = str(REPO / "configs" / "synthetic" / "mask_rcnn_R_18_FPN.yaml")


def pretrain_opts(synthetic, out, iters=4, hidden=64):
    return [*tiny_run_opts(synthetic, out, iters=iters, hidden=hidden), "DATASETS.TEST", "()"]


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    """A 4-iteration captioning run: model_0000001, model_0000003, model_final."""
    from virtex_d2.engine.trainer import Trainer

    out = tmp_path_factory.mktemp("trained")
    cfg = load_config(CAPTIONING, *pretrain_opts(synthetic, out))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    return {"cfg": cfg, "dir": out, "final": out / "model_final.pth"}


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))


# --------------------------------------------------------------------------- atomic writes
def test_full_disk_keeps_the_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    model = small_model()
    ckpt = VirtexCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("model_0000001")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])  # a partial file, then ENOSPC
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointWriteError) as e:
        ckpt.save("model_0000003")
    assert e.value.errno == errno.ENOSPC
    assert "No space left on device" in str(e.value) and "--resume" in str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    monkeypatch.setattr(torch, "save", real_save)
    loaded = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert torch.equal(loaded["model"]["0.weight"], model[0].weight)


def test_pointer_is_written_last_and_atomically(tmp_path, monkeypatch):
    ckpt = VirtexCheckpointer(small_model(), str(tmp_path), save_to_disk=True)
    ckpt.save("model_0000001")
    real_replace = os.replace

    def fail_on_pointer(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError(errno.EIO, "I/O error")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_pointer)
    with pytest.raises(CheckpointWriteError, match="last_checkpoint"):
        ckpt.save("model_0000003")
    # The new file is complete, but the pointer still names the older complete file.
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == [
        "last_checkpoint",
        "model_0000001.pth",
        "model_0000003.pth",
    ]
    torch.load(tmp_path / "model_0000003.pth", weights_only=True)


def test_interrupted_write_leaves_no_file_under_the_final_name(tmp_path, monkeypatch):
    ckpt = VirtexCheckpointer(small_model(), str(tmp_path), save_to_disk=True)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000001")
    assert os.listdir(tmp_path) == []


def test_nonfinite_weights_are_not_written(tmp_path):
    model = small_model()
    ckpt = VirtexCheckpointer(model, str(tmp_path), save_to_disk=True)
    ckpt.save("model_0000001")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"0\.weight.*model_0000001\.pth"):
        ckpt.save("model_0000003")
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


# --------------------------------------------------------------------------- safe loading
class Evil:
    """Unpickling this creates a marker file: pickle runs code."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_trainer_checkpoint_loads_with_weights_only_including_all_state(trained):
    ckpt = torch.load(trained["final"], weights_only=True)
    state = ckpt["trainer"]
    opt = state["_trainer"]["optimizer"]
    assert any("lookahead_slow" in s and "momentum_buffer" in s for s in opt["state"].values())
    assert all("lookahead_counter" in g for g in opt["param_groups"])
    assert "LRScheduler" in state["hooks"]
    rng = state["hooks"]["RNGStateHook"]["states"]
    assert len(rng) == 1 and rng[0]["torch"].dtype == torch.uint8
    assert rng[0]["numpy_keys"].shape == (624,) and isinstance(rng[0]["numpy_pos"], int)
    assert state["hooks"]["TrainLoaderStateHook"]["seed"] == 7
    assert ckpt["iteration"] == 3


def test_pickle_weights_need_an_explicit_opt_in(tmp_path, trained):
    model = small_model()
    marker = tmp_path / "code_ran"
    Evil.marker = str(marker)
    pkl = tmp_path / "legacy.pkl"
    with open(pkl, "wb") as f:
        pickle.dump(
            {
                "model": {k: v.numpy() for k, v in model.state_dict().items()},
                "__author__": "someone",
                "payload": Evil(),
            },
            f,
        )
    pth = tmp_path / "objects.pth"
    torch.save({"model": model.state_dict(), "payload": Evil()}, pth)

    safe = VirtexCheckpointer(small_model(), str(tmp_path))
    with pytest.raises(UnsafeCheckpointError, match="ALLOW_PICKLE_WEIGHTS"):
        safe.load(str(pkl))
    with pytest.raises(UnsafeCheckpointError, match="weights_only=True"):
        safe.load(str(pth))
    assert not marker.exists()

    trusting = VirtexCheckpointer(small_model(), str(tmp_path), allow_pickle=True)
    trusting.load(str(pkl))
    assert marker.exists()  # which is exactly why it is off by default
    cfg = get_cfg()
    add_virtex_config(cfg)
    assert cfg.MODEL.ALLOW_PICKLE_WEIGHTS is False
    assert build_checkpointer(cfg, small_model()).allow_pickle is False


# --------------------------------------------------------------------- checked loading
def test_wrong_architecture_weights_are_an_error_naming_the_keys(synthetic, trained, tmp_path):
    from virtex_d2.engine.trainer import Trainer

    # A detection model's weights into VirTex: the textual head would stay random.
    det = build_model(load_config(MASK_RCNN, "MODEL.DEVICE", "cpu"))
    det_path = tmp_path / "mask_rcnn.pth"
    torch.save({"model": det.state_dict()}, det_path)
    cfg = load_config(
        CAPTIONING, *pretrain_opts(synthetic, tmp_path / "a"), "MODEL.WEIGHTS", str(det_path)
    )
    trainer = Trainer(cfg)
    with pytest.raises(WeightsMismatchError) as e:
        trainer.resume_or_load(resume=False)
    msg = str(e.value)
    assert "mask_rcnn.pth does not fit this model" in msg
    assert "textual_head.embedding (4)" in msg and "missing from the checkpoint" in msg
    assert "roi_heads." in msg  # the checkpoint's own keys hint at what it is

    # A VirTex checkpoint of another width: shapes differ.
    cfg = load_config(
        CAPTIONING,
        *pretrain_opts(synthetic, tmp_path / "b", hidden=32),
        "MODEL.WEIGHTS",
        str(trained["final"]),
    )
    model = build_model(cfg)
    with pytest.raises(
        WeightsMismatchError,
        match=r"textual_head.embedding.words.weight: shape \(\d+, 64\) in the "
        r"checkpoint, \(\d+, 32\) in the model",
    ):
        build_checkpointer(cfg, model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)


def test_detection_needs_the_backbone_but_not_the_heads(trained, tmp_path):
    from virtex_d2.checkpoint import convert_checkpoint, save_d2_checkpoint

    cfg = load_config(MASK_RCNN, "MODEL.DEVICE", "cpu")
    model = build_model(cfg)
    # Unconverted pretraining checkpoint: its "backbone.res2..." names are not the FPN model's
    # "backbone.bottom_up.res2...", so the ResNet would silently stay random.
    with pytest.raises(WeightsMismatchError, match=r"backbone\.bottom_up\.stem \(5\)"):
        build_checkpointer(cfg, model).load(str(trained["final"]))
    converted = tmp_path / "r18_d2.pth"
    save_d2_checkpoint(convert_checkpoint(str(trained["final"]), "virtex_d2"), str(converted))
    build_checkpointer(cfg, model).load(str(converted))  # heads missing: expected
    src = torch.load(trained["final"], weights_only=True)["model"]
    assert torch.equal(
        model.backbone.bottom_up.stem.conv1.weight, src["backbone.stem.conv1.weight"]
    )
    with pytest.raises(WeightsMismatchError, match="roi_heads"):
        build_checkpointer(cfg, model, eval_only=True).load(str(converted))


def test_resume_requires_every_parameter(trained, tmp_path):
    ckpt = torch.load(trained["final"], weights_only=True)
    del ckpt["model"]["textual_head.output.bias"]
    torch.save(ckpt, tmp_path / "model_0000003.pth")
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    cfg = trained["cfg"]
    model = build_model(cfg)
    checkpointer = build_checkpointer(cfg, model, str(tmp_path))
    checkpointer.weights_required = "none"
    with pytest.raises(WeightsMismatchError, match="textual_head.output.bias"):
        checkpointer.resume_or_load("", resume=True)


# ----------------------------------------------------------------------------- configs
def test_bad_config_keys_and_types_give_clear_errors(tmp_path):
    cfg = load_config(CAPTIONING)
    with pytest.raises(
        ConfigError,
        match="unknown config key MODEL.VIRTEX.TEXTUAL_HEAD.HIDEN_SIZE"
        ". Did you mean MODEL.VIRTEX.TEXTUAL_HEAD.HIDDEN_SIZE",
    ):
        merge_config_checked(cfg.clone(), None, ["MODEL.VIRTEX.TEXTUAL_HEAD.HIDEN_SIZE", "64"])
    with pytest.raises(ConfigError, match=r"SOLVER.MAX_ITER takes an int .* got 'ten' \(str\)"):
        merge_config_checked(cfg.clone(), None, ["SOLVER.MAX_ITER", "ten"])
    bad = tmp_path / "bad.yaml"
    bad.write_text(f'_BASE_: "{CAPTIONING}"\nSOLVER:\n  BASE_LRR: 0.1\n')
    with pytest.raises(ConfigError, match=f"config file {bad}: unknown config key SOLVER.BASE_LRR"):
        merge_config_checked(cfg.clone(), str(bad))


def test_train_net_reports_a_bad_key_before_training(synthetic, tmp_path):
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic["root"]))
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config-file",
            CAPTIONING,
            "OUTPUT_DIR",
            str(tmp_path),
            "SOLVER.MAX_ITRE",
            "5",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "unknown config key SOLVER.MAX_ITRE. Did you mean SOLVER.MAX_ITER?" in proc.stderr, (
        proc.stderr[-3000:]
    )
    assert "Starting training" not in proc.stdout + proc.stderr


def test_missing_tokenizer_and_wrong_vocab_size_fail_before_training(synthetic, tmp_path):
    from virtex_d2.engine.trainer import Trainer

    opts = pretrain_opts(synthetic, tmp_path)
    cfg = load_config(CAPTIONING, *opts, "MODEL.VIRTEX.TOKENIZER", str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="nope.json does not exist: build one with"):
        Trainer(cfg)
    cfg = load_config(CAPTIONING, *opts, "MODEL.VIRTEX.VOCAB_SIZE", "999")
    with pytest.raises(ValueError, match="MODEL.VIRTEX.VOCAB_SIZE is 999 but the tokenizer"):
        Trainer(cfg)


# ------------------------------------------------------------------- non-finite losses
def test_nonfinite_loss_stops_naming_every_term_and_keeps_the_good_checkpoint(synthetic, tmp_path):
    from virtex_d2.engine.trainer import Trainer

    cfg = load_config(CAPTIONING, *pretrain_opts(synthetic, tmp_path, iters=6))
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)

    class Diverge(HookBase):  # as if the previous step had blown the weights up
        def before_step(self):
            if self.trainer.iter == 3:
                with torch.no_grad():
                    trainer.model.backbone.stem.conv1.weight.fill_(float("inf"))

    trainer.register_hooks([Diverge()])
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    msg = str(e.value)
    assert "at iteration 3" in msg and "rank 0: loss_caption_forward = nan" in msg
    assert "model_0000001.pth" in msg
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (tmp_path / "model_0000003.pth").exists()
    assert not (tmp_path / "model_final.pth").exists()
    good = torch.load(tmp_path / "model_0000001.pth", weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in good.values() if v.is_floating_point())


def test_amp_grad_scaler_state_is_checkpointed_and_restored(synthetic, tmp_path):
    """The AMP path needs CUDA to train; its scaler state plumbing is checked on CPU."""
    from virtex_d2.engine.trainer import Trainer

    cfg = load_config(CAPTIONING, *pretrain_opts(synthetic, tmp_path))

    def with_scaler(scale):
        t = Trainer(cfg)
        inner = t._trainer
        t._trainer = AMPTrainer(
            inner.model,
            inner.data_loader,
            inner.optimizer,
            grad_scaler=torch.amp.GradScaler("cpu", init_scale=scale),
        )
        return t

    first = with_scaler(2.0**10)
    first.iter = 1
    first.checkpointer.save("model_0000001")
    ckpt = torch.load(tmp_path / "model_0000001.pth", weights_only=True)
    assert ckpt["trainer"]["_trainer"]["grad_scaler"]["scale"] == 2.0**10
    second = with_scaler(1.0)
    second.resume_or_load(resume=True)
    assert second._trainer.grad_scaler.get_scale() == 2.0**10 and second.start_iter == 2


def test_schedule_that_never_leaves_warmup_stops_before_training(tmp_path):
    """SOLVER.MAX_ITER 30 with the synthetic config's 40 warm-up iterations would train at a
    learning rate of ~0 throughout; train_net refuses it with the key and the fix."""
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "train_net.py"),
            "--config-file",
            str(REPO / "configs" / "synthetic" / "bicaptioning_R_18.yaml"),
            "SOLVER.MAX_ITER",
            "30",
            "OUTPUT_DIR",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "SOLVER.WARMUP_ITERS (40) >= SOLVER.MAX_ITER (30)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "metrics.json").exists()
