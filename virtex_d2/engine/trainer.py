"""One Trainer for pretraining, detection fine-tuning and classification transfer.

It is Detectron2's ``DefaultTrainer`` (hooks, checkpointer, metric printer with ETA, JSON and
TensorBoard writers, ``test``) with the choices that depend on the config:
- per meta-architecture, one row of :data:`TASKS` (:class:`TaskSpec`): training and test
  mappers, test loader, optimiser, record checks and evaluator. VirTex: ``CaptionDatasetMapper``
  and ``LookaheadSGD`` with two learning rates; ImageClassifier: ``ClassificationDatasetMapper``
  with batched evaluation; anything else (GeneralizedRCNN, ...): Detectron2's ``DatasetMapper``
  and optimiser. Evaluators are chosen by the dataset's ``evaluator_type``
  (``evaluation.build``);
- CPU data parallelism: ``DistributedDataParallel`` without ``device_ids`` (Detectron2 always
  passes a GPU index, which fails for CPU modules);
- failure behaviour (README "Failure behaviour"): for every task, a resumable training loader
  whose batches depend only on (seed, iteration) and which skips and counts bad records
  (``data.resumable``, ``data.train_loader``), or streaming WebDataset shards for
  ``webdataset:<pattern>`` training sets of VirTex (``data.streaming``); a crash-safe
  checkpointer that refuses pickle and partial loads (``engine.checkpoint``); random state in
  checkpoints and a non-finite loss guard (``engine.hooks``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Callable

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, hooks
from detectron2.engine.defaults import create_ddp_model
from detectron2.evaluation import DatasetEvaluator
from detectron2.solver import build_optimizer
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch import nn

from ..config import add_virtex_config
from ..data.caption_mapper import CaptionDatasetMapper
from ..data.classification_mapper import (
    ClassificationDatasetMapper,
    build_classification_test_loader,
    check_classification_records,
)
from ..data.shards import is_webdataset_name
from ..data.streaming import build_streaming_train_loader
from ..data.train_loader import build_resumable_train_loader
from ..evaluation.build import build_evaluator
from ..solver import build_classification_optimizer, build_lr_scheduler, build_virtex_optimizer
from .amp import CPUAMPTrainer, resolve_cpu_amp_dtype
from .checkpoint import build_checkpointer
from .hooks import (
    RNGRestoreHook,
    RNGStateHook,
    StreamStateHook,
    TrainLoaderStateHook,
    install_nonfinite_guard,
)

Mapper = Callable[[dict], Any]


def _detection_test_loader(cfg: CfgNode, dataset_name: str, mapper: Mapper) -> Iterable:
    return build_detection_test_loader(cfg, dataset_name, mapper=mapper)


@dataclass(frozen=True)
class TaskSpec:
    """What one meta-architecture trains and evaluates with.

    Mappers are built as ``mapper(cfg, is_train)`` (Detectron2's ``configurable`` convention);
    ``test_loader(cfg, dataset_name, mapper)``; ``check_records(cfg, records)`` runs on the
    loaded training records before the first iteration and raises to stop the run;
    ``streams_shards``: ``webdataset:`` training sets are streamed instead of loaded.
    """

    train_mapper: Callable[[CfgNode, bool], Mapper]
    test_mapper: Callable[[CfgNode, bool], Mapper]
    optimizer: Callable[[CfgNode, nn.Module], torch.optim.Optimizer]
    test_loader: Callable[[CfgNode, str, Mapper], Iterable] = _detection_test_loader
    evaluator: Callable[[CfgNode, str, str | None], DatasetEvaluator] = build_evaluator
    check_records: Callable[[CfgNode, list], None] | None = None
    streams_shards: bool = False


# Keyed by MODEL.META_ARCHITECTURE; any other architecture gets DEFAULT_TASK.
TASKS: dict[str, TaskSpec] = {
    "VirTex": TaskSpec(
        train_mapper=CaptionDatasetMapper,
        test_mapper=CaptionDatasetMapper,
        optimizer=build_virtex_optimizer,
        streams_shards=True,
    ),
    "ImageClassifier": TaskSpec(
        train_mapper=ClassificationDatasetMapper,
        test_mapper=ClassificationDatasetMapper,
        optimizer=build_classification_optimizer,
        # Equal-sized crops batch without padding; Detectron2 v0.6 tests one image at a time.
        test_loader=build_classification_test_loader,
        check_records=check_classification_records,
    ),
}
DEFAULT_TASK = TaskSpec(
    train_mapper=DatasetMapper, test_mapper=DatasetMapper, optimizer=build_optimizer
)


def task_spec(cfg: CfgNode) -> TaskSpec:
    """The :data:`TASKS` row of ``cfg``'s meta-architecture (:data:`DEFAULT_TASK` if none)."""
    return TASKS.get(cfg.MODEL.META_ARCHITECTURE, DEFAULT_TASK)


def with_engine_config(cfg):
    """``cfg``, or a copy with virtex-d2's keys added when it lacks them (a plain Detectron2
    config built without :func:`virtex_d2.config.setup_cfg`)."""
    if "VIRTEX_MAX_BAD_FRACTION" in cfg.DATALOADER and "WEIGHTS_REQUIRED" in cfg.MODEL:
        return cfg
    frozen = cfg.is_frozen()
    cfg = cfg.clone()
    cfg.defrost()
    add_virtex_config(cfg)
    if frozen:
        cfg.freeze()
    return cfg


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__ (v0.6 and main), except the DDP wrapping.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        cfg = with_engine_config(cfg)
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        # Before DDP wrapping, so the guard sees the module's own loss dict on every rank.
        install_nonfinite_guard(model, self)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        self._trainer = build_step_runner(cfg, model, data_loader, optimizer, on_cpu)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = build_checkpointer(
            cfg, model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        """Detectron2's hooks, plus random-state capture right before the checkpointer, the
        loader's state, and a final hook undoing random draws of evaluation after a checkpoint.
        """
        ret = super().build_hooks()
        rng = RNGStateHook(self.cfg.SOLVER.CHECKPOINT_PERIOD)
        # Right before the checkpointer; ranks > 0 have none, so the same place in the order
        # (before evaluation) is used there: every rank must take part in the gathering.
        later = (hooks.PeriodicCheckpointer, hooks.EvalHook, hooks.PeriodicWriter)
        at = next((i for i, h in enumerate(ret) if isinstance(h, later)), len(ret))
        ret.insert(at, rng)
        loader = self._trainer.data_loader
        if hasattr(loader, "rank_state"):  # shards: every rank's positions go into checkpoints
            ret.insert(at, StreamStateHook(loader, self.cfg.SOLVER.CHECKPOINT_PERIOD))
        if hasattr(loader, "tracker"):
            ret.append(TrainLoaderStateHook(loader))
        ret.append(RNGRestoreHook(rng))
        return ret

    def resume_or_load(self, resume: bool = True):
        """As Detectron2's; then the training loader starts at the resumed iteration."""
        super().resume_or_load(resume=resume)
        loader = self._trainer.data_loader
        if hasattr(loader, "start_iter"):
            loader.start_iter = self.start_iter

    # Detectron2 v0.6's DefaultTrainer checkpoints neither the optimiser (momentum, Lookahead
    # slow weights, the learning rate in its groups) nor the AMP scaler, so `--resume` would
    # restart them; upstream main saves them under "_trainer", as done here.
    def state_dict(self):
        ret = TrainerBase.state_dict(self)
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        TrainerBase.load_state_dict(self, state_dict)
        if "_trainer" not in state_dict:
            raise KeyError(
                "this checkpoint has no optimizer state (written by another trainer?); resume "
                "needs a checkpoint written by virtex_d2's Trainer, or load it as MODEL.WEIGHTS "
                "without --resume"
            )
        self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_optimizer(cls, cfg, model):
        return task_spec(cfg).optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def build_train_loader(cls, cfg):
        cfg = with_engine_config(cfg)
        spec = task_spec(cfg)
        mapper = spec.train_mapper(cfg, True)
        if spec.streams_shards and any(is_webdataset_name(n) for n in cfg.DATASETS.TRAIN):
            return build_streaming_train_loader(cfg, mapper)
        return build_resumable_train_loader(cfg, mapper, check_records=spec.check_records)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        spec = task_spec(cfg)
        return spec.test_loader(cfg, dataset_name, spec.test_mapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return task_spec(cfg).evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            # Detectron2's csv printout drops every metric whose name has a "-" (BLEU-4,
            # ROUGE-L, APr, AP-<class>); show all of them.
            logging.getLogger("virtex_d2").info("Evaluation results:\n" + results_table(results))
        return results


def build_step_runner(
    cfg: CfgNode,
    model: torch.nn.Module,
    data_loader: Iterable,
    optimizer: torch.optim.Optimizer,
    on_cpu: bool,
) -> SimpleTrainer:
    """The inner training loop: plain fp32, Detectron2's ``AMPTrainer`` on GPUs (fp16 autocast
    and a GradScaler, unchanged), or bf16 autocast on CPUs that compute in bf16 natively
    (``engine.amp``; fp32 elsewhere, said in the log)."""
    if not cfg.SOLVER.AMP.ENABLED:
        return SimpleTrainer(model, data_loader, optimizer)
    if not on_cpu:
        return AMPTrainer(model, data_loader, optimizer)
    dtype = resolve_cpu_amp_dtype(
        cfg.SOLVER.AMP.get("CPU_DTYPE", "auto"), log=logging.getLogger("detectron2")
    )
    if dtype is None:
        return SimpleTrainer(model, data_loader, optimizer)
    return CPUAMPTrainer(model, data_loader, optimizer, dtype=dtype)


def results_table(results: dict) -> str:
    """``{task: {metric: value}}`` (or one level deeper, per dataset) as a text table."""
    from tabulate import tabulate

    rows = []

    def walk(prefix, node):
        for key, value in node.items():
            if isinstance(value, dict):
                walk(f"{prefix}{key}/", value)
            elif "-" not in key or not key.startswith("AP-"):  # per-class AP stays in json
                rows.append((prefix.rstrip("/"), key, f"{value:.4f}"))

    walk("", results)
    return tabulate(rows, headers=["task", "metric", "value"], tablefmt="pipe")
