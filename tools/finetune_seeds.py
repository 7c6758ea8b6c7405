#!/usr/bin/env python
"""Fine-tune one detection config over several seeds and initialisations; a table of final AP
and of the training signals that show a stalled run.

    python tools/finetune_seeds.py --config-file configs/demo/mask_rcnn_R_18_FPN.yaml \\
        --seeds 1 2 3 4 5 --init virtex=output/demo/pretrain/bicaptioning/backbone_d2.pth \\
        --init random= --init "random-nozero=:MODEL.RESNETS.ZERO_INIT_RESIDUAL False" \\
        --output output/seed_study [--jobs 2]

Each ``--init NAME=WEIGHTS[:KEY VALUE ...]`` is one initialisation (empty WEIGHTS: random init;
overrides after ``:``). Runs are ``tools/train_net.py`` subprocesses, ``--jobs`` at a time; a run
whose ``metrics.json`` already holds a final evaluation is reused. Printed per run: box and mask
AP, and, averaged over the metrics logged in the second half of training (Detectron2 logs every
20 iterations), the box-classification loss, the foreground classification accuracy and the RPN
objectness loss: a run that stalls keeps a foreground accuracy of 0 (its box classifier labels
every foreground proposal background) while the RPN trains normally.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from statistics import mean, stdev

from tabulate import tabulate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGNALS = ("loss_cls", "fast_rcnn/fg_cls_accuracy", "loss_rpn_cls")


def read_records(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def summarise(out_dir: str) -> dict[str, float] | None:
    """Final AP and late-training signals of one run; None if it has not finished."""
    records = read_records(os.path.join(out_dir, "metrics.json"))
    final = next((r for r in reversed(records) if "bbox/AP" in r), None)
    if final is None:
        return None
    logged = [r for r in records if "loss_cls" in r]
    train = logged[len(logged) // 2 :]
    row = {"box AP": final["bbox/AP"], "mask AP": final.get("segm/AP", float("nan"))}
    for key in SIGNALS:
        values = [r[key] for r in train if key in r]
        row[key] = mean(values) if values else float("nan")
    return row


def run_one(
    config: str, seed: int, name: str, weights: str, extra: list[str], out: str, threads: int
) -> dict[str, float]:
    out_dir = os.path.join(out, name, f"seed{seed}")
    done = summarise(out_dir)
    if done is not None:
        return done
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        config,
        "SEED",
        str(seed),
        "MODEL.WEIGHTS",
        weights,
        *extra,
        "OUTPUT_DIR",
        out_dir,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "stdout.txt"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{name} seed {seed} failed (exit {proc.returncode}); see {out_dir}")
    result = summarise(out_dir)
    if result is None:
        raise SystemExit(f"{name} seed {seed} finished without an evaluation; see {out_dir}")
    print(f"[{name} seed {seed}] box AP {result['box AP']:.2f}", flush=True)
    return result


def parse_init(spec: str) -> tuple[str, str, list[str]]:
    name, _, rest = spec.partition("=")
    weights, _, extra = rest.partition(":")
    if not name:
        raise SystemExit(f"--init {spec!r}: expected NAME=WEIGHTS[:KEY VALUE ...]")
    return name, weights, extra.split()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--seeds", type=int, nargs="+", required=True)
    p.add_argument("--init", action="append", required=True, metavar="NAME=WEIGHTS[:OPTS]")
    p.add_argument("--output", required=True)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--json", help="also write the table here")
    args = p.parse_args(argv)
    inits = [parse_init(s) for s in args.init]
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    jobs = [(seed, name, w, extra) for seed in args.seeds for name, w, extra in inits]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(
            pool.map(
                lambda j: run_one(args.config_file, j[0], j[1], j[2], j[3], args.output, threads),
                jobs,
            )
        )
    rows, table = [], {}
    for (seed, name, _, _), r in zip(jobs, results):
        table.setdefault(name, {})[seed] = r
        rows.append([name, seed, *(f"{r[k]:.2f}" for k in ("box AP", "mask AP", *SIGNALS))])
    for name, per_seed in table.items():
        for metric in ("box AP", "mask AP"):
            vals = [r[metric] for r in per_seed.values()]
            spread = f" ± {stdev(vals):.2f}" if len(vals) > 1 else ""
            print(f"{name}: {metric} mean {mean(vals):.2f}{spread} over seeds {sorted(per_seed)}")
    print(
        tabulate(rows, headers=["init", "seed", "box AP", "mask AP", *SIGNALS], tablefmt="github")
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
