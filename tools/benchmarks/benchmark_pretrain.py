#!/usr/bin/env python
"""Throughput of a VirTex pretraining step against its CNN-only bound and a reference-style step
(the measurements themselves are in pretrain_measures.py, the steps in pretrain_steps.py).

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
import sys
from pathlib import Path

import torch

# Its modules sit next to this file; also when this file is imported as a module.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_measures import (  # noqa: E402
    measure_ablation,
    measure_alternating,
    measure_loader,
    measure_peak,
    measure_precisions,
    print_ablation,
    print_precision,
)
from pretrain_steps import STEPS  # noqa: E402


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
        ablation = _run(measure_ablation, args)
        print(
            f"{args.config_file}, batch {args.batch_size}, {args.caption_length}-token "
            f"captions, {args.threads or torch.get_num_threads()} threads, alternating step "
            f"by step, median of {args.iters} each; load average {os.getloadavg()[0]:.1f}"
        )
        print_ablation(ablation)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"ablation": ablation, "argv": argv or sys.argv[1:]}, f, indent=2)
        return
    precision = None if args.skip_precision else _run(measure_precisions, args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(
        f"{args.config_file} on {device}, batch {args.batch_size}, "
        f"{args.caption_length}-token captions, {args.iters} timed iterations, "
        f"{args.threads or torch.get_num_threads()} threads"
    )
    if args.only_precision:
        print_precision(precision, args)
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
    timing = _run(measure_alternating, args)
    peaks = {which: _run(functools.partial(measure_peak, which), args) for which in STEPS}
    loader = None if args.skip_loader else _run(measure_loader, args)
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
        print_precision(precision, args)
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
    print_work_rates(results)


def print_work_rates(results: dict) -> None:
    """Forward GMAC per second of each step (fvcore's count x images/s; backward adds about
    twice as much, alike for all three), and the ratios (a) would reach if it ran at the CNN
    bound's rate: the ceilings its FLOP count sets, whatever its kernels."""
    rate = {k: r["gflops_per_image"] * r["images_per_s"] for k, r in results.items()}
    flops = {k: r["gflops_per_image"] for k, r in results.items()}
    print(
        "work rate, forward GMAC/s: "
        + "   ".join(f"{k} {rate[k]:.2f}" for k in ("virtex", "cnn", "reference"))
        + f"   ((a) at {rate['virtex'] / rate['cnn']:.3f} of (b)'s rate)"
    )
    print(
        "ceilings at (b)'s rate: (a)/(b) <= "
        f"{flops['cnn'] / flops['virtex']:.3f}   (a)/(c') <= "
        f"{rate['cnn'] / rate['reference'] * flops['reference'] / flops['virtex']:.2f}x"
    )


if __name__ == "__main__":
    main()
