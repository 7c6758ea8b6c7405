"""One Trainer for pretraining and downstream fine-tuning.

It is Detectron2's ``DefaultTrainer`` (hooks, checkpointer, metric printer with ETA, JSON and
TensorBoard writers, ``test``) with the choices that depend on the config:
- data loader: ``CaptionDatasetMapper`` for the VirTex meta-architecture, Detectron2's
  default ``DatasetMapper`` otherwise;
- optimiser: ``LookaheadSGD`` with two learning rates for VirTex, Detectron2's otherwise;
- evaluator: chosen by the dataset's ``evaluator_type`` (``evaluation.build``);
- CPU data parallelism: ``DistributedDataParallel`` without ``device_ids`` (Detectron2 always
  passes a GPU index, which fails for CPU modules).
"""
from __future__ import annotations

import logging
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase
from detectron2.engine.defaults import create_ddp_model
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..data.caption_mapper import CaptionDatasetMapper
from ..evaluation.build import build_evaluator
from ..solver import build_virtex_optimizer


def is_virtex(cfg) -> bool:
    return cfg.MODEL.META_ARCHITECTURE == "VirTex"


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        # Same steps as DefaultTrainer.__init__ (v0.6 and main), except the DDP wrapping.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_cpu = next(model.parameters()).device.type == "cpu"
        model = create_ddp_model(
            model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {})
        )
        amp = cfg.SOLVER.AMP.ENABLED
        if amp and not torch.cuda.is_available():
            raise ValueError(
                "SOLVER.AMP.ENABLED is True but CUDA is not available; set SOLVER.AMP.ENABLED "
                "False for CPU training"
            )
        self._trainer = (AMPTrainer if amp else SimpleTrainer)(model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(
            model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self)
        )
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

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
        if is_virtex(cfg):
            return build_virtex_optimizer(cfg, model)
        return super().build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        if is_virtex(cfg):
            return build_detection_train_loader(cfg, mapper=CaptionDatasetMapper(cfg, True))
        return super().build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        if is_virtex(cfg):
            return build_detection_test_loader(
                cfg, dataset_name, mapper=CaptionDatasetMapper(cfg, False)
            )
        return super().build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        results = super().test(cfg, model, evaluators)
        if comm.is_main_process() and results:
            # Detectron2's csv printout drops every metric whose name has a "-" (BLEU-4,
            # ROUGE-L, APr, AP-<class>); show all of them.
            logging.getLogger("virtex_d2").info("Evaluation results:\n" + results_table(results))
        return results


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
