"""Measurements of tools/benchmarks/benchmark_pretrain.py, each run in its own process by
that script (so its peak memory is its own): (a)/(b)/(c') alternating, the fast-path ablation,
peak memory and FLOPs, fp32 vs mixed precision, and the data loader alone."""

from __future__ import annotations

import functools
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_steps import (  # noqa: E402
    ABLATION,
    STEPS,
    bench_cfg,
    build_step,
    random_batch,
    run_step,
)


def setup(args, *extra_opts):
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = [*args.opts, *extra_opts]
    if not args.channels_last:
        opts += ["MODEL.VIRTEX.CHANNELS_LAST", "False"]
    return bench_cfg(args.config_file, opts, args.device)


class OneImage(torch.nn.Module):
    """Tensor-in, tensor-out view of a training forward on one sample, for fvcore's tracer
    (Detectron2's own FLOP helper needs its export module, which imports caffe2)."""

    def __init__(self, model, sample):
        super().__init__()
        self.model, self.sample = model, sample

    def forward(self, image):
        return sum(self.model([{**self.sample, "image": image[0]}]).values())


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(step, batch, device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one step."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    step(batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def alternate(steps: dict, batch, args) -> dict:
    """Median step time of each of ``steps`` (name -> step function), one step of each in
    turn, the order rotating, so that load changes hit all alike. Also the median CPU time:
    on a shared machine a step's wall time also counts the time other processes held the
    cores, its CPU time much less so."""
    import statistics

    from detectron2.utils.events import EventStorage

    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    order = list(steps)
    with EventStorage():
        for _ in range(args.warmup):
            for name in order:
                steps[name](batch)
        for i in range(args.iters):
            shift = i % len(order)
            for name in order[shift:] + order[:shift]:
                w, c = timed(steps[name], batch, args.device)
                wall[name].append(w)
                cpu[name].append(c)
    out = {}
    for name in steps:
        median = statistics.median(wall[name])
        out[name] = {
            "median_step_s": median,
            "images_per_s": args.batch_size / median,
            "step_s": wall[name],
            "median_cpu_s": statistics.median(cpu[name]),
            "cpu_s": cpu[name],
        }
    return out


def measure_alternating(args, queue):
    """(a), (b), (c') in one process."""
    cfg = setup(args)
    steps = {}
    for which in STEPS:
        model, steps[which] = build_step(which, cfg, args.device)
        model.train()
    queue.put(alternate(steps, random_batch(cfg, args.batch_size, args.caption_length), args))


def measure_ablation(args, queue):
    steps = {}
    for label, (opts, batched) in ABLATION.items():
        cfg = setup(args, *opts)
        model, steps[label] = build_step("virtex", cfg, args.device)
        model.batched_bicaptioning = batched
        model.train()
    queue.put(alternate(steps, random_batch(cfg, args.batch_size, args.caption_length), args))


def print_ablation(result: dict) -> None:
    print(
        f"{'VirTex step, fast paths added in turn':50s}{'images/s':>9s}{'vs plain':>9s}"
        f"{'CPU s/step':>11s}{'vs plain':>9s}"
    )
    plain = next(iter(result.values()))
    for label, r in result.items():
        print(
            f"{label:50s}{r['images_per_s']:9.2f}"
            f"{r['images_per_s'] / plain['images_per_s']:8.2f}x{r['median_cpu_s']:11.2f}"
            f"{plain['median_cpu_s'] / r['median_cpu_s']:8.2f}x"
        )


def measure_peak(which, args, queue):
    """Peak memory of warm-up steps plus one, and FLOPs per image, of one of STEPS alone."""
    from detectron2.utils.events import EventStorage
    from fvcore.nn import FlopCountAnalysis

    cfg = setup(args)
    batch = random_batch(cfg, args.batch_size, args.caption_length)
    model, step = build_step(which, cfg, args.device)
    model.train()
    with EventStorage():
        for _ in range(args.warmup + 1):
            step(batch)
        peak = peak_memory_mb(args.device)
        # FLOPs of one training-mode forward (fvcore counts one multiply-add as one flop).
        flops = FlopCountAnalysis(OneImage(model, batch[0]), (batch[0]["image"][None],))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
    queue.put({"peak_mb": peak, "gflops_per_image": gflops})


def measure_precisions(args, queue):
    """(d): fp32 and mixed-precision steps of the same VirTex model, alternating."""
    import statistics

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from virtex_d2.engine.amp import cpu_bf16_support
    from virtex_d2.solver import build_virtex_optimizer

    cfg = setup(args)
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    opt = build_virtex_optimizer(cfg, model)
    batch = random_batch(cfg, args.batch_size, args.caption_length)
    cuda = args.device.startswith("cuda")
    device_type = "cuda" if cuda else "cpu"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if cuda else None  # fp16 needs loss scaling

    def step(mixed: bool) -> float:
        run = functools.partial(
            run_step, model, opt, mixed=mixed, device_type=device_type, dtype=amp_dtype,
            scaler=scaler if mixed else None,
        )  # fmt: skip
        return timed(run, batch, args.device)[0]

    times = {False: [], True: []}
    model.train()
    with EventStorage():
        for _ in range(args.warmup):
            step(False)
            step(True)
        for _ in range(args.iters):
            for mixed in (False, True):
                times[mixed].append(step(mixed))
    name = "fp16" if cuda else "bf16"
    medians = {"fp32": statistics.median(times[False]), name: statistics.median(times[True])}
    native, why = (True, "GPU") if cuda else cpu_bf16_support()
    queue.put(
        {
            "amp_dtype": name,
            "native": native,
            "why": why,
            **{
                k: {"median_step_s": v, "images_per_s": args.batch_size / v}
                for k, v in medians.items()
            },
            "speedup": medians["fp32"] / medians[name],
        }
    )


def measure_loader(args, queue):
    from detectron2.data import DatasetCatalog

    from virtex_d2.engine.trainer import Trainer

    cfg = setup(args)
    note = ""
    try:
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    except (FileNotFoundError, OSError) as e:
        note = (
            f"{cfg.DATASETS.TRAIN[0]} not on disk ({type(e).__name__}); "
            "used synthetic_captions_train"
        )
        cfg.DATASETS.TRAIN = ("synthetic_captions_train",)
        cfg.MODEL.VIRTEX.TOKENIZER = "synthetic://"
        cfg.MODEL.VIRTEX.VOCAB_SIZE = synthetic_vocab_size()
    cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    loader = iter(Trainer.build_train_loader(cfg))
    for _ in range(args.warmup):
        next(loader)
    t0 = time.perf_counter()
    n = 0
    for _ in range(args.iters * 4):
        n += len(next(loader))
    elapsed = time.perf_counter() - t0
    # Shut the workers down before this process exits, so none is killed mid-batch.
    del loader
    import gc

    gc.collect()
    queue.put(
        {
            "images_per_s": n / elapsed,
            "peak_mb": peak_memory_mb("cpu"),
            "workers": cfg.DATALOADER.NUM_WORKERS,
            "note": note,
        }
    )


def synthetic_vocab_size() -> int:
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file("configs/synthetic/bicaptioning_R_18.yaml")
    return cfg.MODEL.VIRTEX.VOCAB_SIZE


def print_precision(precision: dict, args) -> None:
    mixed = precision["amp_dtype"]
    print(
        f"(d) VirTex step, alternating, median of {args.iters}: fp32 "
        f"{precision['fp32']['images_per_s']:.2f} vs {mixed} "
        f"{precision[mixed]['images_per_s']:.2f} images/s = {precision['speedup']:.2f}x "
        f"({'native' if precision['native'] else 'EMULATED'}: {precision['why']})"
    )
