#!/usr/bin/env python
"""Pretrain VirTex models and fine-tune downstream detectors with one Detectron2 trainer.

    python tools/train_net.py --config-file configs/synthetic/bicaptioning_R_18.yaml
    python tools/train_net.py --config-file F --eval-only MODEL.WEIGHTS path/to/model.pth
    python tools/train_net.py --config-file F --num-gpus 8          # GPUs, NCCL
    python tools/train_net.py --config-file F --num-gpus 2          # no CUDA: 2 CPU procs, gloo
    torchrun --nproc-per-node 8 tools/train_net.py --config-file F   # torchrun also works
"""
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import virtex_d2
from virtex_d2.engine.launch import launch
from virtex_d2.engine.trainer import Trainer


def setup(args):
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # default_setup configures detectron2's and fvcore's loggers; ours too (same files).
    setup_logger(cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="virtex_d2")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
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
    args = default_argument_parser().parse_args()
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
