"""Running one training stage as a ``tools/train_net.py`` subprocess, resumably.

Why subprocesses rather than in-process ``Trainer`` calls: each stage gets a fresh process
(Mask R-CNN and the captioning model are freed completely between the dozen runs; no state of
Detectron2's global registries, loggers or RNGs leaks from one run into the next), exactly the
documented command line is exercised, and two fine-tunes can run side by side, one thread each,
which on 2 cores is ~1.6x faster than one run with two threads (the small ops of Mask R-CNN at
128 px parallelise poorly within one process).

Reuse: a finished stage leaves ``demo_stage.json`` (its command signature, the evaluation
results, wall and CPU time). A stage with that marker is skipped; one without it but with a
Detectron2 ``last_checkpoint`` is continued with ``--resume`` (train_net then only evaluates
when training had finished). A marker or a started-run record with another signature stops
the demo rather than mixing two configurations in one directory. The signature holds the
command line *and* digests of the resolved config and of the initial weights file, so editing
a config file (or re-pretraining the backbone a fine-tune starts from) is not mistaken for a
finished stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

from virtex_d2.io import atomic_write_text

from .plan import TrainStage
from .results import final_evaluation

MARKER = "demo_stage.json"
STARTED = "demo_stage_started.json"
# Lines of train_net's output worth echoing: Detectron2's metric printer (ETA, losses, time),
# inference progress and errors. Everything else stays in the stage's log.txt / stdout.log.
_PROGRESS_KEYS = (" iter: ", "Inference done", "Total inference time", "Traceback", "Error")

_print_lock = threading.Lock()


class StageError(RuntimeError):
    """A stage failed, or its directory belongs to another configuration."""


def say(message: str) -> None:
    with _print_lock:
        print(message, flush=True)


def fmt_seconds(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s"


def write_json(path: str, payload: dict) -> None:
    """Write ``payload`` atomically (a crash never leaves a half-written marker)."""
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))


def read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def signature(stage: TrainStage, weights: str, repo: str) -> dict[str, object]:
    """What a stage's result depends on: its command line, the config it resolves to (the
    config file, its ``_BASE_`` chain and the overrides) and the initial weights' bytes."""
    from virtex_d2.config import setup_cfg

    cfg = setup_cfg(os.path.join(repo, stage.config), stage.command_opts(weights))
    return {
        "config": stage.config,
        "opts": stage.command_opts(weights),
        "config_digest": hashlib.sha256(cfg.dump().encode()).hexdigest(),
        "weights_digest": _file_digest(weights) if weights else "",
    }


def finished(
    stage: TrainStage, weights: str, repo: str, sig: dict[str, object] | None = None
) -> dict | None:
    """The marker of a finished stage with this signature (``sig``, computed if not given),
    else None (StageError if the directory holds a different run)."""
    sig = sig or signature(stage, weights, repo)
    for name in (MARKER, STARTED):
        record = read_json(os.path.join(stage.output_dir, name))
        if record is None or record.get("signature") == sig:
            continue
        old = record.get("signature") or {}
        if {k: old.get(k) for k in ("config", "opts")} == {k: sig[k] for k in ("config", "opts")}:
            raise StageError(
                f"{stage.output_dir} holds a run of the same command whose resolved config or "
                "initial weights differ from the current ones (a config file or the pretrained "
                "backbone changed since, or it was written by an older virtex-d2); delete that "
                "directory to rerun it, or use another --output"
            )
        raise StageError(
            f"{stage.output_dir} holds a run of another configuration "
            f"({old}); use another --output or delete that directory"
        )
    return read_json(os.path.join(stage.output_dir, MARKER))


@dataclass
class Runner:
    """Runs stages: ``repo`` is the repository root, ``threads`` the torch threads per run."""

    repo: str
    threads: int = 2
    verbose: bool = False

    def command(self, stage: TrainStage, weights: str, resume: bool) -> list[str]:
        cmd = [
            sys.executable,
            os.path.join(self.repo, "tools", "train_net.py"),
            "--config-file",
            os.path.join(self.repo, stage.config),
        ]
        return cmd + (["--resume"] if resume else []) + stage.command_opts(weights)

    def run(self, stage: TrainStage, weights: str = "", index: str = "") -> dict:
        """Run (or reuse, or resume) ``stage``; returns its marker record."""
        tag = f"[{index} {stage.name}]" if index else f"[{stage.name}]"
        # Resolving the config and hashing the weights costs ~1 s: done once per run.
        sig = signature(stage, weights, self.repo)
        done = finished(stage, weights, self.repo, sig)
        if done is not None:
            say(f"{tag} already finished ({fmt_seconds(done['seconds'])}): reused")
            return done
        resume = os.path.isfile(os.path.join(stage.output_dir, "last_checkpoint"))
        write_json(os.path.join(stage.output_dir, STARTED), {"signature": sig})
        cmd = self.command(stage, weights, resume)
        say(f"{tag} {'resuming' if resume else 'starting'}: {shlex.join(cmd[1:])}")
        start = time.time()
        cpu = self._execute(cmd, stage.output_dir, tag)
        seconds = time.time() - start
        results = final_evaluation(os.path.join(stage.output_dir, "metrics.json"))
        record = {
            "signature": sig,
            "seconds": round(seconds, 1),
            # CPU time of the run's process tree: unlike wall time, it hardly depends on the
            # load of the machine, so it shows what the stage costs on a quiet one.
            "cpu_seconds": round(cpu, 1),
            "resumed": resume,
            "results": results,
        }
        write_json(os.path.join(stage.output_dir, MARKER), record)
        say(f"{tag} done in {fmt_seconds(seconds)}" + _summary(results))
        return record

    def _execute(self, cmd: list[str], output_dir: str, tag: str) -> float:
        """Run ``cmd``, echo its progress lines; returns its CPU seconds (user + system)."""
        env = dict(os.environ)
        for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[key] = str(self.threads)
        env.setdefault("PYTHONUNBUFFERED", "1")
        os.makedirs(output_dir, exist_ok=True)
        tail: list[str] = []
        with open(os.path.join(output_dir, "stdout.log"), "a") as log:
            proc = subprocess.Popen(
                cmd,
                cwd=self.repo,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                tail = (tail + [line.rstrip()])[-40:]
                if self.verbose or any(k in line for k in _PROGRESS_KEYS):
                    say(f"{tag} {line.rstrip()}")
            # wait4 (not Popen.wait) also returns the CPU time of this child and of the
            # processes it reaped (data-loader workers), independent of parallel jobs.
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            say("\n".join(tail))
            raise StageError(
                f"{tag} failed (exit code {code}); full output in "
                f"{os.path.join(output_dir, 'stdout.log')}"
            )
        return usage.ru_utime + usage.ru_stime


def _summary(results: dict) -> str:
    parts = []
    for task, metrics in sorted(results.items()):
        for key in ("AP", "CIDEr"):
            if key in metrics:
                parts.append(f"{task} {key} {metrics[key]:.2f}")
    return (": " + ", ".join(parts)) if parts else ""


def run_parallel(runner: Runner, jobs: list[Callable[[], dict]], workers: int) -> list[dict]:
    """Run ``jobs`` (each calling ``runner.run``) with ``workers`` at a time, in order; the first
    failure is raised after the running jobs end."""
    if workers <= 1:
        return [job() for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        futures = [pool.submit(job) for job in jobs]
        try:
            return [f.result() for f in futures]
        except BaseException:
            for f in futures:  # do not start queued stages after a failure
                f.cancel()
            raise
