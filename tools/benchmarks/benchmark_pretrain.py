#!/usr/bin/env python
"""Throughput of a VirTex pretraining step against its CNN-only bound, in one run.

Measures images/s and peak memory of
  (a) the full VirTex training step: forward, backward, gradient clipping, SGD + Lookahead;
  (b) the same Detectron2 ResNet trained alone with a linear classifier on pooled features,
      same batch, plain SGD with momentum (the CNN-only bound);
  (c) the config's training data loader alone, with its configured workers;
  (d) the VirTex step in fp32 and with mixed precision (bf16 autocast on a CPU, fp16 autocast
      with a GradScaler on a GPU), alternating steps in one process so that load changes hit
      both alike; images/s from the median step time of each;
prints fvcore's FLOP count per image for (a) and (b), and ends with the ratio (a)/(b).
Each of (a)-(d) runs in a fresh process so peak memory (RSS on CPU, allocated on GPU) is its
own. On a CPU without native bf16 (see virtex_d2.engine.amp) (d) still runs, emulated, and
says so. ``--smoke``: a seconds-long run of every path (batch 2, 2 iterations, 64 px crops,
no loader), to check the script works, not to measure.

    python tools/benchmarks/benchmark_pretrain.py --config-file configs/pretrain/bicaptioning_R_50_L1_H1024.yaml \
        [--batch-size 16] [--iters 5] [--caption-length 15] [--json OUT] [KEY VALUE ...]

Inputs for (a)/(b) are random 224 crops (the config's CROP_SIZE) and random captions of
``--caption-length`` tokens, so no dataset is needed; (c) uses the config's training set, or the
synthetic captions when that is not on disk (said in the output).
"""
from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import resource
import sys
import time
from unittest import mock

import torch


def _setup(args):
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.MODEL.DEVICE = args.device
    return cfg


def _batch(cfg, batch_size, caption_length, device):
    g = torch.Generator().manual_seed(0)
    size = cfg.INPUT.VIRTEX.CROP_SIZE
    vocab = cfg.MODEL.VIRTEX.VOCAB_SIZE
    out = []
    for _ in range(batch_size):
        body = torch.randint(4, vocab, (caption_length - 2,), generator=g)
        toks = torch.cat([torch.tensor([1]), body, torch.tensor([2])])
        out.append({
            "image": torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8),
            "caption_tokens": toks,
            "noitpac_tokens": torch.cat([toks[:1], toks[1:-1].flip(0), toks[-1:]]),
            "masked_tokens": toks, "mlm_labels": toks * (torch.rand(len(toks), generator=g) < 0.15),
            "token_bag": body.unique(), "labels": torch.tensor([0, 5]),
        })
    return out


class CNNOnly(torch.nn.Module):
    """Detectron2 ResNet + linear classifier on pooled features."""

    def __init__(self, model, num_classes=1000):
        super().__init__()
        self.backbone = model.backbone
        self.pixel_mean, self.pixel_std = model.pixel_mean, model.pixel_std
        channels = self.backbone.output_shape()["res5"].channels
        self.fc = torch.nn.Linear(channels, num_classes)

    def forward(self, batch):
        x = torch.stack([b["image"] for b in batch]).to(self.pixel_mean.device)
        x = (x - self.pixel_mean) / self.pixel_std
        logits = self.fc(self.backbone(x)["res5"].mean(dim=(2, 3)))
        target = torch.zeros(len(batch), dtype=torch.long, device=x.device)
        return {"loss_cls": torch.nn.functional.cross_entropy(logits, target)}


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


def _measure_model(which, args, queue):
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage
    from fvcore.nn import FlopCountAnalysis

    from virtex_d2.solver import build_virtex_optimizer

    cfg = _setup(args)
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    if which == "cnn":
        model = CNNOnly(model).to(args.device)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4,
                              foreach=True)
    else:
        opt = build_virtex_optimizer(cfg, model)
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    batch = _batch(cfg, args.batch_size, args.caption_length, args.device)
    amp = args.device.startswith("cuda") and cfg.SOLVER.AMP.ENABLED
    scaler = torch.amp.GradScaler("cuda") if amp else None

    def step():
        with torch.autocast("cuda", enabled=amp):
            losses = model(batch)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        if scaler:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    model.train()
    with EventStorage():
        for _ in range(args.warmup):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        for _ in range(args.iters):
            step()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        peak = _peak_memory_mb(args.device)
        # FLOPs of one training-mode forward (fvcore counts one multiply-add as one flop).
        flops = FlopCountAnalysis(_OneImage(model, batch[0]), (batch[0]["image"][None],))
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
    queue.put({"images_per_s": args.iters * args.batch_size / elapsed, "peak_mb": peak,
               "gflops_per_image": gflops})


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
    if args.channels_last:
        model.backbone.to(memory_format=torch.channels_last)
    batch = _batch(cfg, args.batch_size, args.caption_length, args.device)
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
    queue.put({
        "amp_dtype": name,
        "native": native,
        "why": why,
        **{k: {"median_step_s": v, "images_per_s": args.batch_size / v}
           for k, v in medians.items()},
        "speedup": medians["fp32"] / medians[name],
    })


def _measure_loader(args, queue):
    from detectron2.data import DatasetCatalog

    from virtex_d2.engine.trainer import Trainer

    cfg = _setup(args)
    note = ""
    try:
        DatasetCatalog.get(cfg.DATASETS.TRAIN[0])
    except (FileNotFoundError, OSError) as e:
        note = f"{cfg.DATASETS.TRAIN[0]} not on disk ({type(e).__name__}); used synthetic_captions_train"
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
    queue.put({"images_per_s": n / elapsed, "peak_mb": _peak_memory_mb("cpu"),
               "workers": cfg.DATALOADER.NUM_WORKERS, "note": note})


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
    print(f"(d) VirTex step, alternating, median of {args.iters}: fp32 "
          f"{precision['fp32']['images_per_s']:.2f} vs {mixed} "
          f"{precision[mixed]['images_per_s']:.2f} images/s = {precision['speedup']:.2f}x "
          f"({'native' if precision['native'] else 'EMULATED'}: {precision['why']})")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="configs/pretrain/bicaptioning_R_50_L1_H1024.yaml")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--caption-length", type=int, default=15,
                   help="tokens per caption including [SOS]/[EOS] (COCO's mean is ~13)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--skip-precision", action="store_true", help="skip (d)")
    p.add_argument("--only-precision", action="store_true", help="run (d) alone")
    p.add_argument("--smoke", action="store_true",
                   help="tiny run of every path (batch 2, 2 iterations, 64 px, no loader)")
    p.add_argument("--json")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.iters, args.warmup, args.caption_length = 2, 2, 1, 8
        args.skip_loader = True
        args.opts = [*args.opts, "INPUT.VIRTEX.CROP_SIZE", "64"]

    precision = None if args.skip_precision else _run(_measure_precisions, args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{args.config_file} on {device}, batch {args.batch_size}, "
          f"{args.caption_length}-token captions, {args.iters} timed iterations")
    if args.only_precision:
        _print_precision(precision, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": device, "precision": precision, "smoke": args.smoke,
                           "argv": sys.argv[1:] if argv is None else list(argv)}, f, indent=2)
        return
    full = _run(functools.partial(_measure_model, "virtex"), args)
    cnn = _run(functools.partial(_measure_model, "cnn"), args)
    loader = None if args.skip_loader else _run(_measure_loader, args)
    print(f"{'':34s}{'images/s':>10s}{'peak MB':>10s}{'GFLOPs/img':>12s}")
    print(f"{'(a) VirTex step (+clip, Lookahead)':34s}{full['images_per_s']:10.2f}"
          f"{full['peak_mb']:10.0f}{full['gflops_per_image']:12.2f}")
    print(f"{'(b) ResNet + linear (CNN bound)':34s}{cnn['images_per_s']:10.2f}"
          f"{cnn['peak_mb']:10.0f}{cnn['gflops_per_image']:12.2f}")
    if loader:
        print(f"{'(c) data loader, %d workers' % loader['workers']:34s}"
              f"{loader['images_per_s']:10.2f}{loader['peak_mb']:10.0f}")
        if loader["note"]:
            print(f"    note: {loader['note']}")
    if precision:
        _print_precision(precision, args)
    ratio = full["images_per_s"] / cnn["images_per_s"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "virtex": full, "cnn_only": cnn, "loader": loader,
                       "precision": precision, "ratio": ratio, "smoke": args.smoke,
                       "argv": sys.argv[1:] if argv is None else list(argv)}, f, indent=2)
    print(f"ratio (a)/(b) images/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
