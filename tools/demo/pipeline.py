"""The demo's command line and its sequence of stages (see ``tools/run_demo.py``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from . import plan as P
from .report import ablation_table, comparison_table, write_report
from .results import METRICS, aggregate, init_metrics, loss_curve, write_results
from .stages import Runner, fmt_seconds, run_parallel, say, write_json

SCHEDULE_NOTE = (
    "Quick mode is sized for <= 15 minutes on 2 idle CPU cores: bicaptioning pretraining of "
    "480 iterations of 16 images (configs/demo/bicaptioning_R_18.yaml), then 8 Mask R-CNN "
    "fine-tunes (COCO and LVIS x VirTex and random x 2 seeds) of 100 iterations of 8 images "
    "each, two at a time with one thread each. The fine-tuning config "
    "(configs/demo/mask_rcnn_R_18_FPN.yaml) shrinks what dominates CPU time and does not "
    "depend on the initialisation: 128 px images, FPN 128 channels, box head FC 256, mask "
    "head 2 x 64 channels, 64 RoIs per image, at most 50 (LVIS: 100) detections. Both inits "
    "get the same config, seed (data order), budget and BN treatment (BN trained, precise BN "
    "before evaluation); only MODEL.WEIGHTS differs. `--full` pretrains 1200 iterations and "
    "fine-tunes 400, with 3 seeds."
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--output", default="output/demo", help="output directory")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--full", action="store_true", help="longer schedules, 3 seeds")
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="a few iterations per stage (tests the machinery; numbers are noise)",
    )
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also pretrain the 4 other tasks and fine-tune each on COCO",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="fine-tuning seeds (default: the mode's; finished seeds are reused)",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=2,
        help="training runs side by side (default 2 = one per core on 2 cores)",
    )
    p.add_argument("--verbose", action="store_true", help="echo all of train_net's output")
    return p.parse_args(argv)


class Demo:
    """State of one demo run: output paths, runners, timings."""

    def __init__(self, args: argparse.Namespace, repo: str):
        self.args, self.repo = args, repo
        self.mode = "smoke" if args.smoke else ("full" if args.full else "quick")
        self.schedule = P.SCHEDULES[self.mode]
        if args.seeds:
            self.schedule = dataclasses.replace(self.schedule, seeds=tuple(args.seeds))
        self.out = os.path.abspath(args.output)
        cores = os.cpu_count() or 1
        self.serial = Runner(repo, threads=cores, verbose=args.verbose)
        self.parallel = Runner(
            repo, threads=max(1, cores // max(1, args.jobs)), verbose=args.verbose
        )
        self.start = time.time()
        self.stages: list[dict] = []

    def log_stage(self, name: str, seconds: float, cpu: float = 0.0, **extra) -> None:
        self.stages.append(
            {"name": name, "seconds": round(seconds, 1), "cpu_seconds": cpu, **extra}
        )
        say(
            f"[{name}] done in {fmt_seconds(seconds)} "
            f"(elapsed {fmt_seconds(time.time() - self.start)})"
        )

    def record(self, stage: P.TrainStage, marker: dict) -> dict:
        reused = marker.get("_reused", False)
        self.stages.append(
            {
                "name": stage.name,
                "seconds": marker["seconds"],
                "cpu_seconds": marker["cpu_seconds"],
                "resumed": marker.get("resumed"),
                "reused": reused,
            }
        )
        return marker

    def train(self, stage: P.TrainStage, runner: Runner, weights: str = "") -> dict:
        from .stages import MARKER

        # A marker of another run makes runner.run raise, so an existing one means reuse.
        reused = os.path.isfile(os.path.join(stage.output_dir, MARKER))
        marker = dict(runner.run(stage, weights))
        marker["_reused"] = reused
        say(f"    (elapsed {fmt_seconds(time.time() - self.start)})")
        return self.record(stage, marker)


def _prepare_data() -> str:
    """Generate the synthetic data if absent; pin its root for the subprocesses."""
    from virtex_d2.data.datasets.builtin import get_datasets_root, register_all_virtex_datasets
    from virtex_d2.data.datasets.synthetic import ensure_synthetic_dataset

    root = os.path.abspath(get_datasets_root())
    os.environ["DETECTRON2_DATASETS"] = root
    register_all_virtex_datasets(root)
    ensure_synthetic_dataset(os.path.join(root, "synthetic"))
    return root


def _convert(stage: P.TrainStage) -> str:
    """The converted backbone of a pretraining stage (reused while newer than its source)."""
    from virtex_d2.checkpoint.convert import convert_checkpoint, save_d2_checkpoint

    source = os.path.join(stage.output_dir, "model_final.pth")
    target = os.path.join(stage.output_dir, "backbone_d2.pth")
    if not (os.path.isfile(target) and os.path.getmtime(target) >= os.path.getmtime(source)):
        save_d2_checkpoint(convert_checkpoint(source, "virtex_d2"), target)
    return target


def run(args: argparse.Namespace, repo: str) -> dict:
    demo = Demo(args, repo)
    sched, out = demo.schedule, demo.out
    os.makedirs(out, exist_ok=True)
    say(
        f"virtex-d2 demo ({demo.mode}) -> {out}; {os.cpu_count()} cores, load average "
        f"{os.getloadavg()[0]:.2f}"
    )
    load_start = os.getloadavg()

    t = time.time()
    root = _prepare_data()
    demo.log_stage(f"data ({root}/synthetic)", time.time() - t)

    # Pretraining: bicaptioning alone uses every core; the ablation's tasks run side by side.
    tasks = list(P.PRETRAIN_TASKS if args.ablation else P.PRETRAIN_TASKS[:1])
    pre = {task: P.pretrain_stage(task, sched, out) for task in tasks}
    pre_results = {"bicaptioning": demo.train(pre["bicaptioning"], demo.serial)}
    others = [lambda s=pre[t]: demo.train(s, demo.parallel) for t in tasks[1:]]
    for task, marker in zip(tasks[1:], run_parallel(demo.parallel, others, args.jobs)):
        pre_results[task] = marker

    t = time.time()
    weights = {task: _convert(pre[task]) for task in tasks}
    demo.log_stage("convert backbones", time.time() - t)

    t = time.time()
    from .captions import caption_report

    bicap = pre["bicaptioning"]
    captions, grounding = caption_report(
        os.path.join(repo, bicap.config),
        bicap.opts + ["OUTPUT_DIR", bicap.output_dir],
        os.path.join(bicap.output_dir, "model_final.pth"),
        grounding_images=8 if demo.mode == "smoke" else 48,
    )
    write_json(os.path.join(out, "captions.json"), {"captions": captions, "grounding": grounding})
    demo.log_stage("caption validation images", time.time() - t)

    fts = P.finetune_stages(sched, out, args.ablation)
    jobs = [lambda s=s: demo.train(s, demo.parallel, weights.get(s.weights_from, "")) for s in fts]
    markers = run_parallel(demo.parallel, jobs, args.jobs)
    by_name = {s.name: m for s, m in zip(fts, markers)}

    per_seed: dict[int, dict] = {}
    for s in fts:
        _, dataset, init, seed = s.name.split("/")
        if init in P.INITS:
            per_seed.setdefault(int(seed[4:]), {}).setdefault(init, {})[dataset] = by_name[s.name][
                "results"
            ]
    results = aggregate(per_seed)
    write_results(os.path.join(out, "results.json"), results)

    ablation = None
    if args.ablation:
        ablation = _ablation(fts, by_name, pre_results)
        write_results(os.path.join(out, "ablation.json"), ablation)

    t = time.time()
    _figures_and_report(
        demo, results, captions, grounding, pre_results, fts, by_name, ablation, pre, load_start
    )
    demo.log_stage("report", time.time() - t)
    say("\n" + comparison_table(results))
    if ablation:
        say("\n" + ablation_table(ablation))
    say(
        f"\ntotal {fmt_seconds(time.time() - demo.start)}; report: "
        f"{os.path.join(out, 'report.md')}, results: {os.path.join(out, 'results.json')}"
    )
    return results


def _ablation(fts, by_name, pre_results) -> dict[str, dict]:
    table: dict[str, dict] = {}
    for task in P.PRETRAIN_TASKS:
        label = "virtex" if task == "bicaptioning" else task
        runs = [
            by_name[s.name]["results"] for s in fts if s.name.startswith(f"finetune/coco/{label}/")
        ]
        per_seed = {i: {label: {"coco": r}} for i, r in enumerate(runs)}
        means = aggregate(per_seed)[label]
        cider = pre_results[task]["results"].get("captioning", {}).get("CIDEr")
        table[task] = {
            "coco_bbox_AP": means.get("coco_bbox_AP"),
            "coco_segm_AP": means.get("coco_segm_AP"),
            "caption_CIDEr": cider,
            "seeds": [init_metrics({"coco": r}) for r in runs],
        }
    return table


def _figures_and_report(
    demo, results, captions, grounding, pre_results, fts, by_name, ablation, pre, load_start
) -> None:
    from .plots import caption_grid, plot_ap_bars, plot_losses

    out = demo.out
    pre_curves = {t: loss_curve(os.path.join(s.output_dir, "metrics.json")) for t, s in pre.items()}
    ft_curves: dict[str, dict] = {}
    for s in fts:
        _, dataset, init, seed = s.name.split("/")
        if init in P.INITS:
            ft_curves.setdefault(dataset, {})[f"{init}/{seed}"] = loss_curve(
                os.path.join(s.output_dir, "metrics.json")
            )
    figures = {"losses": "losses.png", "ap": "ap_by_init.png", "captions": "captions.png"}
    plot_losses(pre_curves, ft_curves, os.path.join(out, figures["losses"]))
    plot_ap_bars(
        results, [m for m in METRICS if m != "lvis_bbox_AP"], os.path.join(out, figures["ap"])
    )
    caption_grid(captions, os.path.join(out, figures["captions"]))
    load_end = os.getloadavg()
    machine = (
        f"{os.cpu_count()} CPU cores, load average (1/5/15 min) "
        f"{'/'.join(f'{x:.1f}' for x in load_start)} at start, "
        f"{'/'.join(f'{x:.1f}' for x in load_end)} at end"
    )
    flags = (
        " --full" * demo.args.full
        + " --smoke" * demo.args.smoke
        + (" --ablation" * demo.args.ablation)
    )
    total = time.time() - demo.start
    write_json(
        os.path.join(out, "stages.json"),
        {"stages": demo.stages, "total_seconds": round(total, 1), "machine": machine},
    )
    cap_metrics = pre_results["bicaptioning"]["results"].get("captioning", {})
    write_report(
        os.path.join(out, "report.md"),
        results=results,
        command=f"python tools/run_demo.py{flags} --output {demo.args.output}",
        mode=demo.mode,
        machine=machine,
        stages=demo.stages,
        total_seconds=total,
        captions=captions,
        caption_metrics=cap_metrics,
        figures=figures,
        schedule_note=SCHEDULE_NOTE,
        ablation=ablation,
        grounding=grounding,
    )


def main(argv: list[str] | None = None, repo: str | None = None) -> int:
    from .stages import StageError

    args = parse_args(argv)
    repo = repo or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        run(args, repo)
    except StageError as e:
        say(f"run_demo: error: {e}")
        return 1
    return 0
