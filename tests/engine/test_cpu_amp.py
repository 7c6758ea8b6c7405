"""SOLVER.AMP.ENABLED on a CPU: bf16 autocast where the CPU has native bf16, fp32 (logged)
elsewhere; Detectron2's AMPTrainer on GPUs."""

from __future__ import annotations

import logging
from unittest import mock

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.engine import AMPTrainer, HookBase, SimpleTrainer
from helpers import load_config, tiny_textual_head_opts

import virtex_d2
from virtex_d2.engine.amp import CPUAMPTrainer, cpu_bf16_support, resolve_cpu_amp_dtype
from virtex_d2.engine.trainer import build_step_runner

X86_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
X86_AMX = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_tile amx_bf16 amx_int8\n"
X86_PLAIN = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        (X86_BF16, True),
        (X86_AMX, True),
        (ARM_BF16, True),
        (X86_PLAIN, False),
        ("", False),
    ],
)
def test_cpu_bf16_support_from_cpuinfo(text, expected):
    supported, why = cpu_bf16_support(text)
    assert supported is expected
    assert torch.backends.cpu.get_cpu_capability() in why


def test_resolve_logs_the_choice(caplog):
    caplog.set_level(logging.INFO)
    log = logging.getLogger("test_cpu_amp")
    assert resolve_cpu_amp_dtype("auto", X86_BF16, log) is torch.bfloat16
    assert "bf16 autocast" in caplog.text and "avx512_bf16" in caplog.text
    caplog.clear()
    # No native bf16: fp32, and the log says so (a warning, not silence).
    assert resolve_cpu_amp_dtype("auto", X86_PLAIN, log) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings and "Training in fp32" in warnings[0].getMessage()
    caplog.clear()
    assert resolve_cpu_amp_dtype("bfloat16", X86_PLAIN, log) is torch.bfloat16
    assert "forced" in caplog.text
    assert resolve_cpu_amp_dtype("float32", X86_BF16, log) is None
    with pytest.raises(ValueError, match="CPU_DTYPE"):
        resolve_cpu_amp_dtype("fp16", X86_BF16, log)


class _Recorder(torch.nn.Module):
    """A one-weight model that records the autocast state its forward ran under."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)
        self.seen = []

    def forward(self, batch):
        self.seen.append((torch.is_autocast_enabled("cpu"), self.linear(batch).dtype))
        return {"loss": self.linear(batch).float().pow(2).mean()}


def _runner(amp: bool, on_cpu: bool, setting: str = "auto"):
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.SOLVER.AMP.ENABLED = amp
    cfg.SOLVER.AMP.CPU_DTYPE = setting
    model = _Recorder()
    loader = iter(lambda: torch.randn(8, 4), None)  # endless
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return build_step_runner(cfg, model, loader, opt, on_cpu), model


def test_step_runner_choice_and_autocast_in_forward():
    from detectron2.utils.events import EventStorage

    with mock.patch("virtex_d2.engine.amp.cpu_bf16_support", return_value=(True, "test")):
        runner, model = _runner(amp=True, on_cpu=True)
    assert type(runner) is CPUAMPTrainer and runner.dtype is torch.bfloat16
    before = model.linear.weight.detach().clone()
    with EventStorage() as storage:
        runner.iter = 0
        runner.storage = storage
        runner.run_step()
    assert model.seen == [(True, torch.bfloat16)]
    assert model.linear.weight.dtype is torch.float32  # fp32 master weights, updated
    assert not torch.equal(model.linear.weight, before)

    with mock.patch("virtex_d2.engine.amp.cpu_bf16_support", return_value=(False, "test")):
        assert type(_runner(amp=True, on_cpu=True)[0]) is SimpleTrainer
        assert type(_runner(amp=True, on_cpu=True, setting="bfloat16")[0]) is CPUAMPTrainer
    assert type(_runner(amp=False, on_cpu=True)[0]) is SimpleTrainer
    assert type(_runner(amp=True, on_cpu=True, setting="float32")[0]) is SimpleTrainer
    # On a GPU: Detectron2's AMPTrainer, as before (it can be built, not run, on a CPU).
    assert type(_runner(amp=True, on_cpu=False)[0]) is AMPTrainer


class _LossCurve(HookBase):
    def __init__(self):
        self.losses = []

    def after_step(self):
        self.losses.append(self.trainer.storage.history("total_loss").latest())


def _record_dtype(seen: set):
    def hook(module, inputs, output):
        seen.add(output["res5"].dtype)

    return hook


def _loss_curve(synthetic, out, amp: bool, iters: int) -> tuple:
    """(total loss per iteration, dtypes of the ResNet's output seen during training)."""
    from detectron2.utils.env import seed_all_rng

    from virtex_d2.engine.trainer import Trainer

    cfg = load_config(
        "synthetic/bicaptioning_R_18.yaml",
        *tiny_textual_head_opts(synthetic),
        "INPUT.VIRTEX.CROP_SIZE", "64", "SOLVER.IMS_PER_BATCH", "4",
        "SOLVER.MAX_ITER", str(iters), "SOLVER.WARMUP_ITERS", "5",
        "SOLVER.CHECKPOINT_PERIOD", "1000", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
        "SOLVER.AMP.ENABLED", str(amp), "SOLVER.AMP.CPU_DTYPE", "auto",
        "OUTPUT_DIR", str(out), "SEED", "3",
    )  # fmt: skip
    # train_net.py seeds through default_setup; here both runs must start from the same weights.
    seed_all_rng(cfg.SEED)
    trainer = Trainer(cfg)
    assert (type(trainer._trainer) is CPUAMPTrainer) is amp
    curve = _LossCurve()
    trainer.register_hooks([curve])
    dtypes: set = set()
    trainer.model.backbone.register_forward_hook(_record_dtype(dtypes))
    trainer.resume_or_load(resume=False)
    trainer.train()
    return curve.losses, dtypes


# Mean total loss over windows of 10 iterations: bf16 must stay within REL_TOL of fp32's in every
# window, and every single step within STEP_TOL. Measured on this CPU (AVX512-BF16): 0.11% and
# 0.36% (README, "CPU mixed precision").
WINDOW, REL_TOL, STEP_TOL = 10, 0.01, 0.03


@pytest.mark.skipif(
    not cpu_bf16_support()[0],
    reason="this CPU has no native bf16 (avx512_bf16 / amx_bf16 / Arm bf16): "
    f"{cpu_bf16_support()[1]}",
)
def test_bf16_loss_curve_follows_fp32(synthetic, tmp_path):
    """50 bicaptioning R-18 iterations (same seed, so the same batches and dropout) in fp32 and
    with bf16 autocast: the windowed mean losses agree to REL_TOL, and both fall."""
    fp32, fp32_dtypes = _loss_curve(synthetic, tmp_path / "fp32", amp=False, iters=50)
    bf16, bf16_dtypes = _loss_curve(synthetic, tmp_path / "bf16", amp=True, iters=50)
    assert fp32_dtypes == {torch.float32} and bf16_dtypes == {torch.bfloat16}
    assert len(fp32) == len(bf16) == 50
    assert fp32[0] == pytest.approx(bf16[0], rel=1e-3)  # same weights and batch at step 0
    means = [
        (sum(fp32[i : i + WINDOW]) / WINDOW, sum(bf16[i : i + WINDOW]) / WINDOW)
        for i in range(0, 50, WINDOW)
    ]
    rel = [abs(b - f) / f for f, b in means]
    assert max(rel) <= REL_TOL, f"windowed means (fp32, bf16): {means}"
    assert max(abs(b - f) / f for f, b in zip(fp32, bf16)) <= STEP_TOL
    assert means[-1][0] < 0.8 * means[0][0] and means[-1][1] < 0.8 * means[0][1], means
    assert fp32 != bf16  # the bf16 run did compute in bf16
