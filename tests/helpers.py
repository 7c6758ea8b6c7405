"""Shared builders for tests (not a test module)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from detectron2.config import get_cfg

import virtex_d2

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
COCO_TINY = SHARED / "data" / "coco_tiny"

WORDS = (
    "a red circle left of a blue square above the green triangle right big small two "
    "three yellow star bright rights on table dog cat sitting near"
).split()


def write_captions_json(path: Path, captions: list[str]) -> Path:
    """A COCO captions file with one image per caption."""
    images = [
        {"id": i, "file_name": f"{i}.jpg", "height": 64, "width": 64} for i in range(len(captions))
    ]
    anns = [{"id": i, "image_id": i, "caption": c} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def make_tokenizer(tmp_path: Path, vocab_size: int = 64):
    import random

    from virtex_d2.data.tokenizer import train_vocabulary

    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(400)]
    cap = write_captions_json(tmp_path / "caps.json", captions)
    return train_vocabulary([cap], vocab_size, tmp_path / f"vocab_{vocab_size}.json")


def virtex_cfg(
    task: str = "bicaptioning",
    depth: int = 18,
    layers: int = 1,
    hidden: int = 64,
    tokenizer_path: str = "",
    vocab_size: int = 64,
):
    """A small CPU VirTex config (no datasets)."""
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(str(REPO / "configs" / "pretrain" / "Base-VirTex.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.RESNETS.DEPTH = depth
    if depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    v = cfg.MODEL.VIRTEX
    v.TASK = task
    v.TOKENIZER = tokenizer_path
    v.VOCAB_SIZE = vocab_size
    v.TEXTUAL_HEAD.NUM_LAYERS = layers
    v.TEXTUAL_HEAD.HIDDEN_SIZE = hidden
    v.TEXTUAL_HEAD.NUM_HEADS = max(1, hidden // 32)
    v.TEXTUAL_HEAD.FEEDFORWARD_SIZE = hidden * 4
    v.NUM_MULTILABEL_CLASSES = 7
    cfg.SOLVER.AMP.ENABLED = False
    return cfg


def _needs_coco_tiny():
    import pytest

    return pytest.mark.skipif(
        not COCO_TINY.is_dir(), reason=f"shared real-photo data not found at {COCO_TINY}"
    )


needs_coco_tiny = _needs_coco_tiny()


def tiny_textual_head_opts(synthetic: dict, hidden: int = 64) -> list:
    """Config overrides: the `synthetic` fixture's vocabulary and a ``hidden``-wide textual head
    (2 heads, feed-forward twice as wide)."""
    return [
        "MODEL.VIRTEX.TOKENIZER",
        synthetic["tokenizer"],
        "MODEL.VIRTEX.VOCAB_SIZE",
        str(synthetic["vocab_size"]),
        "MODEL.VIRTEX.TEXTUAL_HEAD.HIDDEN_SIZE",
        str(hidden),
        "MODEL.VIRTEX.TEXTUAL_HEAD.NUM_HEADS",
        "2",
        "MODEL.VIRTEX.TEXTUAL_HEAD.FEEDFORWARD_SIZE",
        str(2 * hidden),
    ]


def tiny_run_opts(
    synthetic: dict,
    out,
    *,
    iters: int,
    batch: int = 4,
    crop: int = 64,
    warmup: int = 2,
    workers: int = 0,
    seed: int = 7,
    hidden: int = 64,
) -> list:
    """Config overrides of the tests' short pretraining runs: the tiny textual head, crop size,
    batch, schedule (a checkpoint every 2 iterations), loader workers, output folder and seed."""
    return [
        *tiny_textual_head_opts(synthetic, hidden),
        "INPUT.VIRTEX.CROP_SIZE",
        str(crop),
        "SOLVER.IMS_PER_BATCH",
        str(batch),
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.WARMUP_ITERS",
        str(warmup),
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "DATALOADER.NUM_WORKERS",
        str(workers),
        "OUTPUT_DIR",
        str(out),
        "SEED",
        str(seed),
    ]


def load_tool(name: str):
    """A script of ``tools/`` (or ``tools/benchmarks/``) imported as a module, by file name."""
    import importlib.util

    for folder in (REPO / "tools", REPO / "tools" / "benchmarks"):
        path = folder / f"{name}.py"
        if path.is_file():
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return module
    raise FileNotFoundError(f"no tools/{name}.py or tools/benchmarks/{name}.py")


def learning_rates(cfg, steps: int) -> list[float]:
    """The learning rate of the first ``steps`` iterations under the Trainer's scheduler (one
    tiny parameter, ``SOLVER.BASE_LR``)."""
    from virtex_d2.solver import build_lr_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.SOLVER.BASE_LR)
    sched = build_lr_scheduler(cfg, opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def load_config(path, *opts):
    """The one way tests build a config from a file: Detectron2's defaults, every virtex-d2
    key, the file (absolute, or relative to ``configs/``), then ``KEY VALUE`` overrides; on the
    CPU. Not frozen, so a test may still change it."""
    path = Path(path)
    if not path.is_absolute():
        path = REPO / "configs" / path
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(str(path))
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", *[str(o) if not isinstance(o, str) else o for o in opts]]
    )
    return cfg


def sigkill_when_marker_appears(cmd: list, marker: Path, *, cwd, env, limit_s: float = 300) -> int:
    """Start ``cmd``, wait for it to create ``marker`` (its way of saying "I am at the kill
    point"), SIGKILL it there, and return its exit status (``-SIGKILL``). Fails the test if the
    process exits first (with its stderr) or never gets there within ``limit_s``."""
    import os
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + limit_s
    try:
        while not marker.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.2)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    return proc.returncode


# tools/train_net.py's training plus a hook that, after iteration ``kill_after``, creates
# ``marker`` and waits to be SIGKILLed (by sigkill_when_marker_appears): a run killed in the
# middle of a checkpoint period. Run as ``python -c KILLED_TRAIN_NET.format(...) ARGS``.
KILLED_TRAIN_NET = """
import sys, time
sys.path.insert(0, {tools!r})
import train_net
from detectron2.engine import HookBase
from virtex_d2.engine.trainer import Trainer

class Freeze(HookBase):
    def after_step(self):
        if self.trainer.iter == {kill_after}:
            open({marker!r}, "w").close()
            time.sleep(600)

args = train_net.default_argument_parser().parse_args(sys.argv[1:])
trainer = Trainer(train_net.setup(args))
trainer.resume_or_load(resume=False)
trainer.register_hooks([Freeze()])
trainer.train()
"""


def training_env(synthetic: dict) -> dict:
    """Environment of a training subprocess on the test's synthetic data. One thread: CPU
    kernels then reduce in a fixed order in every process, so exact-resume runs can be
    compared bit for bit."""
    import os

    return dict(os.environ, DETECTRON2_DATASETS=str(synthetic["root"]), OMP_NUM_THREADS="1")


def kill_train_net_midway(config: str, opts: list, out: Path, synthetic: dict, kill_after: int):
    """Run tools/train_net.py's training with ``config`` and ``opts`` and SIGKILL it after
    iteration ``kill_after`` (between two checkpoints), in ``out``."""
    import signal
    import sys

    marker = out.parent / f"{out.name}.frozen"
    child = KILLED_TRAIN_NET.format(
        tools=str(REPO / "tools"), kill_after=kill_after, marker=str(marker)
    )
    returncode = sigkill_when_marker_appears(
        [sys.executable, "-c", child, "--config-file", config, *opts],
        marker,
        cwd=REPO,
        env=training_env(synthetic),
    )
    assert returncode == -signal.SIGKILL


def assert_same_final_state(full: Path, resumed: Path, iters: int, optimizer_states: tuple):
    """The final checkpoints of an uninterrupted and a resumed run hold the same iteration,
    weights, optimizer state (param groups and the named per-parameter ``optimizer_states``)
    and LR scheduler; returns the resumed one's ``model`` dict."""
    import torch

    a = torch.load(full / "model_final.pth", weights_only=True)
    b = torch.load(resumed / "model_final.pth", weights_only=True)
    assert a["iteration"] == b["iteration"] == iters - 1
    assert a["model"].keys() == b["model"].keys()
    differ = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not differ, differ
    opt_a, opt_b = a["trainer"]["_trainer"]["optimizer"], b["trainer"]["_trainer"]["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]  # LR (and Lookahead's counter)
    for i, state in opt_a["state"].items():
        for name in optimizer_states:
            assert torch.equal(state[name], opt_b["state"][i][name]), (i, name)
    assert a["trainer"]["hooks"]["LRScheduler"] == b["trainer"]["hooks"]["LRScheduler"]
    return b["model"]
