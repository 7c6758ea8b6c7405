#!/usr/bin/env python
"""Throughput of a VirTex pretraining step against its CNN-only bound and a reference-style step.

Step times, one process, the three steps alternating step by step (so that load changes hit
all alike), images/s from the median step time of each:
  (a) the full VirTex training step: forward, backward, gradient clipping, SGD + Lookahead, with
      this repository's fast paths (channels-last ResNet, fused SGD, multi-tensor clipping and
      Lookahead, bicaptioning's shared parts batched);
  (b) the CNN-only bound: the same Detectron2 ResNet, same layout and batch, trained alone with
      a linear classifier on pooled features, plain SGD with momentum (the same fused kernel);
  (c') a reference-style step (tools/benchmarks/reference_step.py): torchvision ResNet,
      nn.TransformerDecoder per direction run separately, one parameter group per parameter,
      the reference's Lookahead loop and clip_grad_norm_;
and, each in a fresh process so its peak memory (RSS on CPU, allocated on GPU) is its own, the
peak memory and fvcore's FLOPs per image of (a), (b) and (c'). Also
  (c) the config's training data loader alone, with its configured workers;
  (d) the VirTex step in fp32 and with mixed precision (bf16 autocast on a CPU, fp16 autocast
      with a GradScaler on a GPU), alternating steps in one process; on a CPU without native
      bf16 (see virtex_d2.engine.amp) (d) still runs, emulated, and says so.
Ends with the ratios (a)/(b) and (a)/(c') of images/s. ``--smoke``: a seconds-long run of every
path (batch 2, 2 iterations, 64 px crops, no loader, all in one process), to check the script
works, not to measure.

    python tools/benchmarks/benchmark_pretrain.py \
        [--config-file configs/pretrain/bicaptioning_R_50_L1_H1024.yaml] [--batch-size 16] \
        [--iters 5] [--caption-length 15] [--json OUT] [KEY VALUE ...]

Inputs for (a)/(b)/(c') are random 224 crops (the config's CROP_SIZE) and random captions of
``--caption-length`` tokens, so no dataset is needed; (c) uses the config's training set, or the
synthetic captions when that is not on disk (said in the output).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path
from unittest import mock

import torch

# Its modules sit next to this file; also when this file is imported as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_steps import ABLATION, STEPS, bench_cfg, build_step, random_batch  # noqa: E402


def _setup(args, *extra_opts):
    if args.threads:
        torch.set_num_threads(args.threads)
    opts = [*args.opts, *extra_opts]
    if not args.channels_last:
        opts += ["MODEL.VIRTEX.CHANNELS_LAST", "False"]
    return bench_cfg(args.config_file, opts, args.device)


class _OneImage(torch.nn.Module):
    """Tensor-in, tensor-out view of a training forward on one sample, for fvcore's tracer
    (Detectron2's own FLOP helper needs its export module, which imports caffe2)."""

    def __init__(self, model, sample):
        super().__init__()
        self.model, self.sample = model, sample

    def forward(self, image):
        return sum(self.model([{**self.sample, "image": image[0]}]).values())


def _peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(step, batch, device) -> tuple[float, float]:
    """Wall seconds and this process's CPU seconds (all threads) of one step."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    step(batch)
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0


def _alternate(steps: dict, batch, args) -> dict:
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
                w, c = _timed(steps[name], batch, args.device)
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


def _measure_alternating(args, queue):
    """(a), (b), (c') in one process."""
    cfg = _setup(args)
    steps = {}
    for which in STEPS:
        model, steps[which] = build_step(which, cfg, args.device)
        model.train()
    queue.put(_alternate(steps, random_batch(cfg, args.batch_size, args.caption_length), args))


def _measure_ablation(args, queue):
    steps = {}
    for label, (opts, batched) in ABLATION.items():
        cfg = _setup(args, *opts)
        model, steps[label] = build_step("virtex", cfg, args.device)
        model.batched_bicaptioning = batched
        model.train()
    queue.put(_alternate(steps, random_batch(cfg, args.batch_size, args.caption_length), args))


def _print_ablation(result: dict) -> None:
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


def _measure_peak(which, args, queue):
    """Peak memory of warm-up steps plus one, and FLOPs per image, of one of STEPS alone."""
    from detectron2.utils.events import EventStorage
    from fvcore.nn import FlopCountAnalysis

    cfg = _setup(args)
    batch = random_batch(cfg, args.batch_size, args.caption_length)
    model, step = build_step(which, cfg, args.device)
    model.train()
    with EventStorage():
        for _ in range(args.warmup + 1):
            step(batch)
        peak = _peak_memory_mb(args.device)
        # FLOPs of one training-mode forward (fvcore counts one multiply-add as one flop).
        flops = FlopCountAnalysis(_OneImage(model, batch[0]), (batch[0]["image"][None],))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
    queue.put({"peak_mb": peak, "gflops_per_image": gflops})


def _measure_precisions(args, queue):
    """(d): fp32 and mixed-precision steps of the same VirTex model, alternating."""
    import statistics

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from virtex_d2.engine.amp import cpu_bf16_support
    from virtex_d2.solver import build_virtex_optimizer

    cfg = _setup(args)
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    opt = build_virtex_optimizer(cfg, model)
    batch = random_batch(cfg, args.batch_size, args.caption_length)
    cuda = args.device.startswith("cuda")
    device_type = "cuda" if cuda else "cpu"
    amp_dtype = torch.float16 if cuda else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda") if cuda else None  # fp16 needs loss scaling

    def step(mixed: bool) -> float:
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type, dtype=amp_dtype, enabled=mixed):
            loss = sum(model(batch).values())
        opt.zero_grad(set_to_none=True)
        if mixed and scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - t0

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


def _measure_loader(args, queue):
    from detectron2.data import DatasetCatalog

    from virtex_d2.engine.trainer import Trainer

    cfg = _setup(args)
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
        cfg.MODEL.VIRTEX.VOCAB_SIZE = _synthetic_vocab_size()
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
            "peak_mb": _peak_memory_mb("cpu"),
            "workers": cfg.DATALOADER.NUM_WORKERS,
            "note": note,
        }
    )


def _synthetic_vocab_size() -> int:
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file("configs/synthetic/bicaptioning_R_18.yaml")
    return cfg.MODEL.VIRTEX.VOCAB_SIZE


class _Result:
    """A one-item stand-in for a multiprocessing queue, for in-process runs."""

    def put(self, item):
        self.item = item


def _run(target, args):
    if args.smoke:
        # Separate processes only keep peak memory apart; a smoke run measures nothing, and
        # three interpreter starts would be most of its time.
        result = _Result()
        target(args, result)
        return result.item
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(args, queue))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except Exception:  # queue.Empty: keep waiting while the measurement runs
            if not proc.is_alive():
                name = getattr(target, "func", target).__name__  # partials have no name
                raise SystemExit(f"{name} failed (exit code {proc.exitcode})")
    proc.join()
    return result


def _print_precision(precision: dict, args) -> None:
    mixed = precision["amp_dtype"]
    print(
        f"(d) VirTex step, alternating, median of {args.iters}: fp32 "
        f"{precision['fp32']['images_per_s']:.2f} vs {mixed} "
        f"{precision[mixed]['images_per_s']:.2f} images/s = {precision['speedup']:.2f}x "
        f"({'native' if precision['native'] else 'EMULATED'}: {precision['why']})"
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="configs/pretrain/bicaptioning_R_50_L1_H1024.yaml")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument(
        "--caption-length",
        type=int,
        default=15,
        help="tokens per caption including [SOS]/[EOS] (COCO's mean is ~13)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: torch's); on a machine whose cores other jobs "
        "share, 1 avoids threads waiting for a descheduled partner",
    )
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-precision", action="store_true", help="skip (d)")
    p.add_argument("--only-precision", action="store_true", help="run (d) alone")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="only the VirTex step with its fast paths added one at a time",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run of every path (batch 2, 2 iterations, 64 px, no loader)",
    )
    p.add_argument("--json")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.iters, args.warmup, args.caption_length = 2, 2, 1, 8
        args.skip_loader = True
        args.opts = [*args.opts, "INPUT.VIRTEX.CROP_SIZE", "64"]

    if args.ablation:
        ablation = _run(_measure_ablation, args)
        print(
            f"{args.config_file}, batch {args.batch_size}, {args.caption_length}-token "
            f"captions, {args.threads or torch.get_num_threads()} threads, alternating step "
            f"by step, median of {args.iters} each; load average {os.getloadavg()[0]:.1f}"
        )
        _print_ablation(ablation)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ablation": ablation, "argv": argv or sys.argv[1:]}, f, indent=2)
        return
    precision = None if args.skip_precision else _run(_measure_precisions, args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{args.config_file} on {device}, batch {args.batch_size}, "
        f"{args.caption_length}-token captions, {args.iters} timed iterations, "
        f"{args.threads or torch.get_num_threads()} threads"
    )
    if args.only_precision:
        _print_precision(precision, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "device": device,
                        "precision": precision,
                        "smoke": args.smoke,
                        "argv": sys.argv[1:] if argv is None else list(argv),
                    },
                    f,
                    indent=2,
                )
        return
    timing = _run(_measure_alternating, args)
    peaks = {which: _run(functools.partial(_measure_peak, which), args) for which in STEPS}
    loader = None if args.skip_loader else _run(_measure_loader, args)
    results = {which: {**timing[which], **peaks[which]} for which in STEPS}
    print(
        f"(a), (b), (c') alternating step by step, median of {args.iters} each; peak memory "
        "and FLOPs each in its own process"
    )
    print(f"{'':38s}{'images/s':>10s}{'CPU s/step':>11s}{'peak MB':>10s}{'GFLOPs/img':>12s}")
    for which, label in STEPS.items():
        r = results[which]
        print(
            f"{label:38s}{r['images_per_s']:10.2f}{r['median_cpu_s']:11.2f}"
            f"{r['peak_mb']:10.0f}{r['gflops_per_image']:12.2f}"
        )
    if loader:
        print(
            f"{'(c) data loader, %d workers' % loader['workers']:38s}"
            f"{loader['images_per_s']:10.2f}{loader['peak_mb']:10.0f}"
        )
        if loader["note"]:
            print(f"    note: {loader['note']}")
    if precision:
        _print_precision(precision, args)
    ratio = results["virtex"]["images_per_s"] / results["cnn"]["images_per_s"]
    ratio_reference = results["virtex"]["images_per_s"] / results["reference"]["images_per_s"]
    cpu = {k: r["median_cpu_s"] for k, r in results.items()}
    cpu_ratios = {
        "ratio": cpu["cnn"] / cpu["virtex"],
        "ratio_reference": cpu["reference"] / cpu["virtex"],
    }
    load = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": device,
                    "virtex": results["virtex"],
                    "cnn_only": results["cnn"],
                    "reference": results["reference"],
                    "loader": loader,
                    "precision": precision,
                    "ratio": ratio,
                    "ratio_reference": ratio_reference,
                    "cpu_time_ratios": cpu_ratios,
                    "load_average": load,
                    "smoke": args.smoke,
                    "argv": sys.argv[1:] if argv is None else list(argv),
                },
                f,
                indent=2,
            )
    print(
        f"ratio (a)/(b) images/s: {ratio:.3f}   (a)/(c'): {ratio_reference:.2f}x   "
        f"(load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f})"
    )
    print(
        f"by CPU time per step:   {cpu_ratios['ratio']:.3f}            "
        f"{cpu_ratios['ratio_reference']:.2f}x"
    )


if __name__ == "__main__":
    main()
