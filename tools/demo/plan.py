"""What a demo run consists of: schedules per mode, and the list of stages they imply.

Every training stage is a ``tools/train_net.py`` call (config file + ``KEY VALUE`` overrides)
writing into its own directory under the demo output. Fine-tunes from VirTex and from random
init of the same dataset and seed differ *only* in ``MODEL.WEIGHTS``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from virtex_d2.config import CAPTIONING_TASKS, PRETRAINING_TASKS

PRETRAIN_TASKS = PRETRAINING_TASKS  # bicaptioning (the main comparison) first
DATASETS = ("coco", "lvis")
INITS = ("virtex", "random")


@dataclass(frozen=True)
class Schedule:
    """Budgets of one mode; the configs carry the architecture and the learning rates."""

    seeds: tuple[int, ...]
    pretrain_opts: tuple[str, ...] = ()  # extra overrides on configs/demo/<task>_R_18.yaml
    finetune_opts: tuple[str, ...] = ()  # extra overrides on configs/demo/*mask_rcnn*.yaml
    datasets: tuple[str, ...] = DATASETS


# Quick: the configs as they are (see the comments in configs/demo/*.yaml for the budget).
# Full: 2.5x the pretraining, 2x the fine-tuning (steps scaled alike), three seeds.
# Smoke: a few iterations on a tiny dataset, to test the machinery (tests/tools/test_demo.py).
_SMOKE_FT = (
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.CHECKPOINT_PERIOD",
    "1",
    "TEST.PRECISE_BN.ENABLED",
    "False",
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MIN_SIZE_TEST",
    "64",
)
SCHEDULES: dict[str, Schedule] = {
    "quick": Schedule(seeds=(1, 2)),
    "full": Schedule(
        seeds=(1, 2, 3),
        pretrain_opts=("SOLVER.MAX_ITER", "1200", "SOLVER.WARMUP_ITERS", "100"),
        finetune_opts=("SOLVER.MAX_ITER", "400", "SOLVER.STEPS", "(300, 370)"),
    ),
    "smoke": Schedule(
        seeds=(1,),
        pretrain_opts=(
            "SOLVER.MAX_ITER",
            "2",
            "SOLVER.WARMUP_ITERS",
            "1",
            "SOLVER.IMS_PER_BATCH",
            "4",
            "SOLVER.CHECKPOINT_PERIOD",
            "1",
            "DATALOADER.NUM_WORKERS",
            "0",
            "INPUT.VIRTEX.CROP_SIZE",
            "64",
            "INPUT.VIRTEX.TEST_RESIZE",
            "64",
            "INPUT.VIRTEX.TEST_CROP_SIZE",
            "64",
            "MODEL.VIRTEX.DECODER.BEAM_SIZE",
            "1",
            # A tiny dataset's captions cannot fill a 200-token vocabulary.
            "MODEL.VIRTEX.VOCAB_SIZE",
            "120",
        ),
        finetune_opts=_SMOKE_FT,
    ),
}


@dataclass
class TrainStage:
    """One ``tools/train_net.py`` run."""

    name: str  # e.g. "finetune/coco/virtex/seed1"
    config: str  # config file, relative to the repository root
    opts: list[str] = field(default_factory=list)
    output_dir: str = ""
    weights_from: str | None = None  # pretraining task whose converted backbone is used

    def command_opts(self, weights: str = "") -> list[str]:
        """The overrides passed on the command line (MODEL.WEIGHTS filled in for fine-tunes)."""
        opts = list(self.opts) + ["OUTPUT_DIR", self.output_dir]
        if self.weights_from is not None or self.name.startswith("finetune"):
            opts = ["MODEL.WEIGHTS", weights] + opts
        return opts


def pretrain_config(task: str) -> str:
    return os.path.join("configs", "demo", f"{task}_R_18.yaml")


def finetune_config(dataset: str) -> str:
    name = "mask_rcnn_R_18_FPN.yaml" if dataset == "coco" else "lvis_mask_rcnn_R_18_FPN.yaml"
    return os.path.join("configs", "demo", name)


def pretrain_stage(task: str, schedule: Schedule, out: str, extra: tuple[str, ...] = ()):
    opts = ["SEED", "0", *schedule.pretrain_opts, *extra]
    if task not in CAPTIONING_TASKS:
        # Caption metrics need a captioning model; the other tasks are judged by transfer only.
        opts += ["DATASETS.TEST", "()"]
    return TrainStage(
        name=f"pretrain/{task}",
        config=pretrain_config(task),
        opts=opts,
        output_dir=os.path.join(out, "pretrain", task),
    )


def finetune_stage(dataset: str, init: str, seed: int, schedule: Schedule, out: str):
    """``init``: "random" or a pretraining task name (its converted backbone)."""
    label = "virtex" if init == "bicaptioning" else init
    return TrainStage(
        name=f"finetune/{dataset}/{label}/seed{seed}",
        config=finetune_config(dataset),
        opts=["SEED", str(seed), *schedule.finetune_opts],
        output_dir=os.path.join(out, "finetune", dataset, label, f"seed{seed}"),
        weights_from=None if init == "random" else init,
    )


def finetune_stages(schedule: Schedule, out: str, ablation: bool) -> list[TrainStage]:
    """Main comparison first; per (dataset, seed) the VirTex and random runs are adjacent, so
    that with two parallel jobs they run side by side under the same machine load."""
    stages = []
    for dataset in schedule.datasets:
        for seed in schedule.seeds:
            stages += [
                finetune_stage(dataset, i, seed, schedule, out) for i in ("bicaptioning", "random")
            ]
    if ablation:
        for task in PRETRAIN_TASKS[1:]:
            stages += [finetune_stage("coco", task, s, schedule, out) for s in schedule.seeds]
    return stages
