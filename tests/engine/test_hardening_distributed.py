"""A failed or hung process of a multi-process (gloo) run ends the whole run within a bounded
time, naming the rank (README "Failure behaviour")."""
import os
import re
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from virtex_d2.engine.launch import ProcessFailedError, launch

BOUND_S = 60


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


def _launch_timed(fn, *args, timeout_s: float = 1800) -> tuple[ProcessFailedError, float]:
    start = time.time()
    with pytest.raises(ProcessFailedError) as e:
        launch(fn, 2, args=args, timeout=timedelta(seconds=timeout_s))
    return e.value, time.time() - start


def test_a_raising_rank_ends_the_run_and_is_named():
    error, elapsed = _launch_timed(_collective_loop, 1, "raise")
    assert elapsed < BOUND_S
    assert str(error).startswith("rank 1 (process 1 of 2 on machine 0) raised an exception")
    assert "simulated failure at iteration 2" in str(error)


def test_a_rank_that_exits_ends_the_run_and_is_named():
    error, elapsed = _launch_timed(_collective_loop, 1, "exit")
    assert elapsed < BOUND_S
    assert "rank 1 (process 1 of 2 on machine 0) exited with code 1" in str(error)


def test_a_hung_rank_is_bounded_by_the_collective_timeout():
    # Rank 1 stays alive but stops taking part: rank 0's all-reduce times out after 5 s, rank 0
    # exits, and the launcher terminates rank 1.
    error, elapsed = _launch_timed(_collective_loop, 1, "hang", timeout_s=5)
    assert elapsed < BOUND_S
    assert str(error).startswith("rank 0 ")
    assert re.search("timed out|timeout", str(error), re.IGNORECASE), str(error)[-2000:]


def _trainer_worker(opts: list, fail_rank: int) -> None:
    from detectron2.engine import HookBase
    from detectron2.utils import comm
    from test_hardening_checkpoint import CAPTIONING, tiny_cfg

    from virtex_d2.engine.trainer import Trainer

    class DieAtTwo(HookBase):
        def before_step(self):
            if self.trainer.iter == 2 and comm.get_rank() == fail_rank:
                os._exit(1)

    trainer = Trainer(tiny_cfg(CAPTIONING, *opts))
    trainer.resume_or_load(resume=False)
    trainer.register_hooks([DieAtTwo()])
    trainer.train()


def test_training_stops_when_one_rank_dies_mid_run(synthetic, tmp_path):
    from test_hardening_checkpoint import pretrain_opts

    opts = pretrain_opts(synthetic, tmp_path, iters=20)
    error, elapsed = _launch_timed(_trainer_worker, opts, 1)
    assert elapsed < 2 * BOUND_S  # includes starting two training processes
    assert "rank 1 (process 1 of 2 on machine 0) exited with code 1" in str(error)
    assert not (tmp_path / "model_final.pth").exists()
