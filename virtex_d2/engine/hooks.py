"""Training hooks for exact resume and early failure.

- :class:`RNGStateHook` stores every rank's Python/NumPy/torch random state in checkpoints (as
  tensors and ints, so ``torch.load(weights_only=True)`` reads them) and restores it on resume;
  :class:`RNGRestoreHook` undoes random draws of the hooks that run after the checkpoint
  (evaluation), so the uninterrupted run and a resumed one continue from the same state.
- :class:`TrainLoaderStateHook` stores the training loader's seed and its list of bad records,
  and logs the bad-record count as the ``data/bad_records`` scalar.
- :class:`NonFiniteLossGuard` (a forward hook on the model) stops training at the first
  non-finite loss, before the optimizer step, naming the iteration and every loss term of
  every rank.
"""

from __future__ import annotations

import logging
import random
import weakref
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.resumable import ResumableTrainLoader

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- random state
def capture_rng_state() -> dict[str, Any]:
    """This process's random state as tensors/ints/floats (safe for weights_only loading)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, words, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "python_version": int(version),
        "python_words": torch.tensor(words, dtype=torch.int64),
        "python_gauss_next": gauss_next,  # None or a float
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_cached_gaussian"],
        )
    )
    random.setstate(
        (
            state["python_version"],
            tuple(int(w) for w in state["python_words"].tolist()),
            state["python_gauss_next"],
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class RNGStateHook(HookBase):
    """Capture every rank's random state at the iterations where a checkpoint is written.

    Must run on every rank (it gathers) and before ``PeriodicCheckpointer``, which uses the same
    rule for when to write: every ``period`` iterations and at the last one.
    """

    def __init__(self, period: int):
        self.period = period
        self.states: list[dict[str, Any]] | None = None
        self.captured_at: int | None = None

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it + 1 >= self.trainer.max_iter:
            self.states = comm.all_gather(capture_rng_state())
            self.captured_at = it

    def restore_own(self) -> None:
        if self.states is not None:
            restore_rng_state(self.states[comm.get_rank()])

    def state_dict(self) -> dict[str, Any]:
        return {"states": self.states} if self.states is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        states = list(state["states"])
        if len(states) != comm.get_world_size():
            logger.warning(
                "The checkpoint holds the random state of %d process(es) but this run has %d; "
                "random streams restart, so the resumed run will not match an uninterrupted one "
                "exactly (weights, optimizer and data order are restored).",
                len(states),
                comm.get_world_size(),
            )
            return
        self.states = states
        self.restore_own()


class RNGRestoreHook(HookBase):
    """The last hook: where a checkpoint was written, reset the random state to the captured one,
    undoing draws of hooks that ran after the checkpoint (e.g. evaluation)."""

    def __init__(self, capture: RNGStateHook):
        self.capture = capture

    def after_step(self) -> None:
        if self.capture.captured_at == self.trainer.iter:
            self.capture.restore_own()


class TrainLoaderStateHook(HookBase):
    """Checkpoint the training loader's seed and bad records; log how many records were bad."""

    def __init__(self, loader: ResumableTrainLoader):
        self.loader = loader

    def after_step(self) -> None:
        self.trainer.storage.put_scalar(
            "data/bad_records", len(self.loader.tracker.bad), smoothing_hint=False
        )

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loader.load_state_dict(state)


class StreamStateHook(HookBase):
    """Gather every rank's shard positions where a checkpoint is written (streaming loader).

    Only rank 0 writes checkpoints, but each rank reads its own shards: its position must reach
    rank 0 before the checkpointer runs. Runs on every rank, before ``PeriodicCheckpointer``,
    with the same rule for when to write as :class:`RNGStateHook`.
    """

    def __init__(self, loader: Any, period: int):
        self.loader, self.period = loader, period

    def after_step(self) -> None:
        it = self.trainer.iter
        if (it + 1) % self.period == 0 or it + 1 >= self.trainer.max_iter:
            state = self.loader.rank_state()
            self.loader.gathered = comm.all_gather(state) if comm.get_world_size() > 1 else [state]


# ------------------------------------------------------------------------------- losses
class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or infinite; raised before the optimizer step."""


class NonFiniteLossGuard:
    """Forward hook: in training mode, check the loss dict for NaN/inf on every rank.

    Every rank takes part in one tiny all-reduce per forward pass, so all ranks stop at the same
    iteration (none is left waiting in a collective), and the message lists every rank's terms.
    The step is not taken, so no NaN reaches the weights or a checkpoint.
    """

    def __init__(self, iteration: Callable[[], int], last_checkpoint: Callable[[], str]):
        self.iteration, self.last_checkpoint = iteration, last_checkpoint

    def __call__(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if not module.training or not isinstance(output, Mapping) or not output:
            return
        values = torch.stack([torch.as_tensor(v).detach().float().sum() for v in output.values()])
        flag = (~torch.isfinite(values)).any().to(torch.int32).reshape(1)
        if comm.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not int(flag.item()):
            return
        terms = {k: float(v) for k, v in zip(output, values.tolist())}
        per_rank = comm.all_gather(terms) if comm.get_world_size() > 1 else [terms]
        lines = [
            f"  rank {r}: " + ", ".join(f"{k} = {v:.6g}" for k, v in t.items())
            for r, t in enumerate(per_rank)
        ]
        raise NonFiniteLossError(
            f"a loss became NaN or infinite at iteration {self.iteration()}:\n"
            + "\n".join(lines)
            + "\nThe optimizer step was not taken and no checkpoint was written with it; the "
            f"last checkpoint is {self.last_checkpoint()}. Lower the learning rate "
            "(SOLVER.BASE_LR, SOLVER.VIRTEX.TEXTUAL_LR) or keep gradient clipping on, then "
            "continue from that checkpoint with --resume."
        )


def install_nonfinite_guard(model: torch.nn.Module, trainer: Any) -> None:
    """Register :class:`NonFiniteLossGuard` on ``model`` without a strong reference cycle."""
    ref = weakref.ref(trainer)

    def iteration() -> int:
        t = ref()
        return t.iter if t is not None else -1

    def last_checkpoint() -> str:
        t = ref()
        c = getattr(t, "checkpointer", None)
        return c.get_checkpoint_file() if c is not None and c.has_checkpoint() else "(none yet)"

    model.register_forward_hook(NonFiniteLossGuard(iteration, last_checkpoint))
