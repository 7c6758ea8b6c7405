#!/usr/bin/env python
"""Where a VirTex pretraining step spends its time: torch.profiler over a few steps.

Runs warm-up steps, then profiles ``--steps`` training steps (forward, backward, clipping, SGD,
Lookahead, as Detectron2's SimpleTrainer runs them) of the config's model on random 224 crops
and random captions, and prints CPU time per part per step:

- forward parts from the ``record_function`` ranges in the model and optimiser
  (``virtex.backbone``, ``virtex.visual_projection``, ``virtex.embedding``,
  ``virtex.forward_transformer``, ``virtex.backward_transformer``, ``virtex.output_layer``,
  ``virtex.loss``, ``virtex.clip_grad_norm``, ``virtex.sgd_step``, ``virtex.lookahead``);
- the backward pass in total and by part: each autograd node is charged to the range its
  forward op ran in (matched by sequence number, as the profiler itself links the two);
  what no range claims (gradient accumulation into the tied embedding/output matrix) is
  "backward, unattributed".

Lookahead syncs every STEPS (5) iterations, so ``--steps 5`` holds exactly one sync and its row
is the average cost per step. The times are CPU times of the ops (on a GPU that is launch time,
not kernel time). On a machine whose cores other jobs share, ``--threads 1`` keeps the threads
of one op from waiting for a descheduled partner.

    python tools/benchmarks/profile_pretrain.py [--config-file F] [--batch-size 16] \
        [--steps 5] [--warmup 2] [--threads N] [--unbatched] [--trace trace.json] [KEY VALUE ...]

``KEY VALUE`` overrides switch the fast paths off for comparison, e.g.
``MODEL.VIRTEX.CHANNELS_LAST False SOLVER.VIRTEX.FOREACH False``; ``--unbatched`` runs
bicaptioning's two directions through ``caption_loss`` one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pretrain_steps import bench_cfg, random_batch  # noqa: E402

# Range name -> row label, in table order.
PARTS = {
    "virtex.backbone": "backbone (ResNet)",
    "virtex.visual_projection": "visual projection",
    "virtex.embedding": "embedding (both directions)",
    "virtex.forward_transformer": "transformer, forward direction",
    "virtex.backward_transformer": "transformer, backward direction",
    "virtex.output_layer": "output layer",
    "virtex.loss": "loss",
    "virtex.clip_grad_norm": "gradient clipping",
    "virtex.sgd_step": "optimizer step (SGD)",
    "virtex.lookahead": "Lookahead",
}
STEP, BACKWARD = "profile.step", "profile.backward"
_BACKWARD_NODE = "autograd::engine::evaluate_function: "


def _range_of(event, names) -> str | None:
    while event is not None:
        if event.name in names:
            return event.name
        event = event.cpu_parent
    return None


def breakdown(events, steps: int) -> dict:
    """ms per step: {"forward": {part: ms}, "backward": {part: ms}, "step": ms,
    "backward_total": ms} from a profiler's ``events()``."""
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    totals: dict[str, float] = defaultdict(float)
    owner: dict[tuple[int, int], str] = {}
    nodes = []
    for e in events:
        if e.name in PARTS or e.name in (STEP, BACKWARD):
            totals[e.name] += e.cpu_time_total
        if e.name.startswith(_BACKWARD_NODE):
            nodes.append(e)
        elif e.sequence_nr >= 0 and _range_of(e, (BACKWARD,)) is None:
            part = _range_of(e, PARTS)
            if part is not None:
                owner.setdefault((e.sequence_nr, e.thread), part)
    for e in nodes:
        part = owner.get((e.sequence_nr, e.fwd_thread), "unattributed")
        backward[part] += e.cpu_time_total
    for name in PARTS:
        forward[name] = totals[name]
    ms = 1e-3 / steps
    return {
        "forward": {k: v * ms for k, v in forward.items()},
        "backward": {k: v * ms for k, v in backward.items()},
        "step": totals[STEP] * ms,
        "backward_total": totals[BACKWARD] * ms,
    }


def format_table(result: dict) -> str:
    step = result["step"]
    rows = []
    claimed = 0.0
    for name, label in PARTS.items():
        f, b = result["forward"].get(name, 0.0), result["backward"].get(name, 0.0)
        if f == 0.0 and b == 0.0:
            continue
        claimed += f + b
        rows.append((label, f, b))
    unattributed = result["backward_total"] - sum(
        v for k, v in result["backward"].items() if k != "unattributed"
    )
    claimed += unattributed
    rows.append(("backward, unattributed (grad accumulation)", 0.0, unattributed))
    rows.append(("other (input, zero_grad, Python)", step - claimed, 0.0))
    lines = [
        f"{'part':44s}{'forward':>10s}{'backward':>10s}{'total':>10s}{'% step':>8s}",
        f"{'':44s}{'ms':>10s}{'ms':>10s}{'ms':>10s}",
    ]
    for label, f, b in rows:
        lines.append(f"{label:44s}{f:10.1f}{b:10.1f}{f + b:10.1f}{100 * (f + b) / step:8.1f}")
    lines.append(
        f"{'backward pass, total':44s}{'':10s}{result['backward_total']:10.1f}"
        f"{result['backward_total']:10.1f}{100 * result['backward_total'] / step:8.1f}"
    )
    lines.append(f"{'step':44s}{'':10s}{'':10s}{step:10.1f}{100.0:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config-file", default="configs/pretrain/bicaptioning_R_50_L1_H1024.yaml")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--caption-length", type=int, default=15)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument(
        "--unbatched", action="store_true", help="bicaptioning: one caption_loss call per direction"
    )
    p.add_argument("--trace", help="also write a Chrome trace here")
    p.add_argument("--json")
    p.add_argument("opts", nargs=argparse.REMAINDER, default=[])
    args = p.parse_args(argv)

    from detectron2.modeling import build_model

    from virtex_d2.solver import build_virtex_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = bench_cfg(args.config_file, args.opts, args.device)
    with mock.patch("virtex_d2.data.vocabulary.resolve_tokenizer", return_value=None):
        model = build_model(cfg)
    model.batched_bicaptioning = not args.unbatched
    opt = build_virtex_optimizer(cfg, model)
    batch = random_batch(cfg, args.batch_size, args.caption_length)
    model.train()

    def step():
        # Detectron2's SimpleTrainer.run_step, without the data loader and metric writing.
        with record_function(STEP):
            loss = sum(model(batch).values())
            opt.zero_grad()
            with record_function(BACKWARD):
                loss.backward()
            opt.step()

    for _ in range(args.warmup):
        step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    wall = (time.perf_counter() - t0) / args.steps
    if args.trace:
        prof.export_chrome_trace(args.trace)
    result = breakdown(prof.events(), args.steps)
    print(
        f"{args.config_file}, batch {args.batch_size}, {args.caption_length}-token captions, "
        f"{args.device}, {torch.get_num_threads()} threads; {args.steps} profiled steps after "
        f"{args.warmup} warm-up; load average {os.getloadavg()[0]:.1f}"
    )
    print(
        f"options: {' '.join(args.opts) or 'defaults'}"
        f"{', unbatched bicaptioning' if args.unbatched else ''}"
    )
    print(format_table(result))
    print(f"wall time per profiled step {wall * 1e3:.0f} ms (profiler overhead included)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**result, "wall_ms": wall * 1e3, "argv": argv or sys.argv[1:]}, f, indent=2)
    return result


if __name__ == "__main__":
    main()
