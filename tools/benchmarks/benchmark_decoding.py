#!/usr/bin/env python
"""Time cached vs uncached beam search in one run; the last line prints the speed-up.

Default setting (issue #4): R-50 with the L1_H1024 head, 10K vocabulary, batch 8, beam 5,
30 decoding steps, untrained weights. The ResNet forward is timed separately, since both paths
share it.

    python tools/benchmarks/benchmark_decoding.py [--batch-size 8] [--beam-size 5] [--max-length 30]
        [--hidden 1024] [--layers 1] [--depth 50] [--repeats 2] [--device cpu] [--json OUT]
        [--smoke]

``--smoke``: a seconds-long run (R-18, 64-wide head, 100 tokens, batch 2, beam 2, 6 steps,
64 px) that checks the script works; its timings mean nothing.
"""

from __future__ import annotations

import argparse
import json
import time
from unittest import mock

import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

import virtex_d2


def build(args):
    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file("configs/pretrain/Base-VirTex.yaml")
    cfg.MODEL.DEVICE = args.device
    cfg.MODEL.RESNETS.DEPTH = args.depth
    if args.depth in (18, 34):
        cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64  # Detectron2's rule for BasicBlock ResNets
    v = cfg.MODEL.VIRTEX
    v.TASK = "captioning"
    v.VOCAB_SIZE = args.vocab_size
    v.TEXTUAL_HEAD.NUM_LAYERS = args.layers
    v.TEXTUAL_HEAD.HIDDEN_SIZE = args.hidden
    v.TEXTUAL_HEAD.NUM_HEADS = args.hidden // 64
    v.TEXTUAL_HEAD.FEEDFORWARD_SIZE = 4 * args.hidden
    v.DECODER.BEAM_SIZE = args.beam_size
    v.DECODER.MAX_LENGTH = args.max_length
    v.MAX_CAPTION_LENGTH = max(v.MAX_CAPTION_LENGTH, args.max_length)
    # Untrained weights need no vocabulary file; token ids are never turned into text here.
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        return build_model(cfg).eval()


def timed(fn, repeats: int, device: str):
    best, out = float("inf"), None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--beam-size", type=int, default=5)
    p.add_argument("--max-length", type=int, default=30)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=2, help="report the best of this many runs")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", help="write the numbers here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.batch_size, args.beam_size, args.max_length, args.repeats = 2, 2, 6, 1
        args.hidden, args.depth, args.vocab_size, args.image_size = 64, 18, 100, 64

    torch.manual_seed(0)
    model = build(args)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    with torch.no_grad():
        t_cnn, features = timed(lambda: model.backbone(images)["res5"], args.repeats, args.device)
        t_cached, cached = timed(
            lambda: model.generate(features, "beam", use_cache=True), args.repeats, args.device
        )
        t_full, full = timed(
            lambda: model.generate(features, "beam", use_cache=False), args.repeats, args.device
        )
    # Steps run: one per generated token, plus one for [EOS] when a caption ended early.
    steps = min(max(len(t) for t in cached) + 1, args.max_length)
    same = cached == full
    result = {
        "device": str(torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "beam_size": args.beam_size,
        "steps": steps,
        "resnet_s": t_cnn,
        "cached_beam_s": t_cached,
        "uncached_beam_s": t_full,
        "identical_tokens": same,
        "speedup": t_full / t_cached,
        "smoke": args.smoke,
    }
    print(
        f"device {result['device']} ({result['threads']} threads), R-{args.depth} "
        f"L{args.layers}_H{args.hidden}, vocab {args.vocab_size}, batch {args.batch_size}, "
        f"beam {args.beam_size}, {steps} steps"
    )
    print(f"ResNet forward:          {t_cnn:8.3f} s")
    print(f"beam search, uncached:   {t_full:8.3f} s  (whole prefix recomputed every step)")
    print(f"beam search, cached k/v: {t_cached:8.3f} s")
    print(f"identical tokens: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"speed-up (uncached / cached): {result['speedup']:.2f}x")
    if not same:
        raise SystemExit("cached and uncached beam search produced different tokens")
    return result


if __name__ == "__main__":
    main()
