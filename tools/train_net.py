#!/usr/bin/env python
"""Pretrain VirTex models and fine-tune downstream detectors with one Detectron2 trainer.

    python tools/train_net.py --config-file configs/synthetic/bicaptioning_R_18.yaml
    python tools/train_net.py --config-file F --eval-only MODEL.WEIGHTS path/to/model.pth
    python tools/train_net.py --config-file F --resume             # continue after a crash
    python tools/train_net.py --config-file F --num-gpus 8          # GPUs, NCCL
    python tools/train_net.py --config-file F --num-gpus 2          # no CUDA: 2 CPU procs, gloo
    torchrun --nproc-per-node 8 tools/train_net.py --config-file F   # torchrun also works

What happens on bad data, bad configs, crashes and failed processes: README "Failure behaviour".
"""

from __future__ import annotations

from datetime import timedelta

import torch
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from virtex_d2.config import ConfigError, setup_cfg
from virtex_d2.engine.checkpoint import build_checkpointer
from virtex_d2.engine.launch import DEFAULT_TIMEOUT, launch
from virtex_d2.engine.trainer import Trainer


def setup(args):
    try:
        cfg = setup_cfg(args.config_file, args.opts, freeze=False)
    except ConfigError as e:  # a message naming the key and the fix, not a traceback
        raise SystemExit(f"train_net: config error: {e}") from None
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            f"MODEL.DEVICE is {cfg.MODEL.DEVICE!r} (set by {args.config_file} or Detectron2's "
            "default) but no CUDA device is available; add `MODEL.DEVICE cpu` to the command"
        )
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; ours too (same files).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="virtex_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        build_checkpointer(cfg, model, cfg.OUTPUT_DIR, eval_only=True).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            from detectron2.evaluation import verify_results

            verify_results(cfg, results)
        return results
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument(
        "--dist-timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT.total_seconds(),
        help="seconds a process waits in a collective (e.g. for a dead peer) before failing",
    )
    args = parser.parse_args()
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        timeout=timedelta(seconds=args.dist_timeout_s),
    )
