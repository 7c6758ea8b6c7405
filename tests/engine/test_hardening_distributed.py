"""A failed or hung process of a multi-process (gloo) run ends the whole run within a bounded
time, naming the rank (README "Failure behaviour").

Each run is launched from a child interpreter killed after the bound: a launcher that hangs
fails its test with ``TimeoutExpired`` (and never hangs the suite), without timing assertions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from helpers import REPO

from virtex_d2.engine.launch import ProcessFailedError, launch

BOUND_S = 120  # seconds, including the child interpreter's start (imports torch and detectron2)


def _collective_loop(fail_rank: int, how: str) -> None:
    """Ten iterations with one all-reduce each; ``fail_rank`` fails at iteration 2."""
    for it in range(10):
        if dist.get_rank() == fail_rank and it == 2:
            if how == "raise":
                raise RuntimeError(f"simulated failure at iteration {it}")
            if how == "exit":
                os._exit(1)
            time.sleep(300)  # "hang": alive, but never joins the next collective
        dist.all_reduce(torch.ones(1))


def child_main(argv: str) -> None:
    """In the child: launch 2 processes of the named function; print the launcher's error."""
    name, args, timeout_s = json.loads(argv)
    try:
        launch(globals()[name], 2, args=tuple(args), timeout=timedelta(seconds=timeout_s))
    except ProcessFailedError as e:
        print(json.dumps({"error": str(e)}))
    else:
        print(json.dumps({"error": None}))


def _launch_bounded(fn, *args, timeout_s: float = 1800, bound_s: float = BOUND_S) -> str:
    """The ProcessFailedError text of launching ``fn`` on 2 ranks; the child interpreter is
    killed (and the test fails) if the run has not ended within ``bound_s`` seconds."""
    here = Path(__file__).resolve().parent
    path = os.pathsep.join(
        [str(here), str(here.parent), str(REPO), os.environ.get("PYTHONPATH", "")]
    )
    code = "import sys, test_hardening_distributed as t; t.child_main(sys.argv[1])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps([fn.__name__, list(args), timeout_s])],
        env={**os.environ, "PYTHONPATH": path},
        capture_output=True,
        text=True,
        timeout=bound_s,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"error"')]
    assert lines, f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    error = json.loads(lines[-1])["error"]
    assert error is not None, "the launcher returned although a rank failed"
    return error


def test_a_raising_rank_ends_the_run_and_is_named():
    error = _launch_bounded(_collective_loop, 1, "raise")
    assert str(error).startswith("rank 1 (process 1 of 2 on machine 0) raised an exception")
    assert "simulated failure at iteration 2" in str(error)


def test_a_rank_that_exits_ends_the_run_and_is_named():
    error = _launch_bounded(_collective_loop, 1, "exit")
    assert "rank 1 (process 1 of 2 on machine 0) exited with code 1" in str(error)


def test_a_hung_rank_is_bounded_by_the_collective_timeout():
    # Rank 1 stays alive but stops taking part: rank 0's all-reduce times out after 5 s, rank 0
    # exits, and the launcher terminates rank 1.
    error = _launch_bounded(_collective_loop, 1, "hang", timeout_s=5)
    assert str(error).startswith("rank 0 ")
    assert re.search("timed out|timeout", str(error), re.IGNORECASE), str(error)[-2000:]


def _trainer_worker(opts: list, fail_rank: int) -> None:
    from detectron2.engine import HookBase
    from detectron2.utils import comm
    from helpers import load_config
    from test_hardening_checkpoint import CAPTIONING

    from virtex_d2.engine.trainer import Trainer

    class DieAtTwo(HookBase):
        def before_step(self):
            if self.trainer.iter == 2 and comm.get_rank() == fail_rank:
                os._exit(1)

    trainer = Trainer(load_config(CAPTIONING, *opts))
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([DieAtTwo()])
    trainer.train()


def test_training_stops_when_one_rank_dies_mid_run(synthetic, tmp_path):
    from test_hardening_checkpoint import pretrain_opts

    opts = pretrain_opts(synthetic, tmp_path, iters=20)
    # The bound includes starting two training processes.
    error = _launch_bounded(_trainer_worker, opts, 1, bound_s=2 * BOUND_S)
    assert "rank 1 (process 1 of 2 on machine 0) exited with code 1" in str(error)
    assert not (tmp_path / "model_final.pth").exists()
