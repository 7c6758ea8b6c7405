"""A training data loader whose output depends only on (seed, iteration), so that a run resumed
from a checkpoint sees exactly the batches an uninterrupted run would have seen.

Detectron2's ``TrainingSampler`` restarts its stream when a run is resumed, and data-loader
workers reseed from the initial seed, so augmentations after a resume differ from those of an
uninterrupted run. Here:

- :class:`SampleStream` defines the global order of samples: position ``p`` lies in epoch ``e``,
  a permutation (after repeat-factor rounding, for LVIS) drawn from a generator seeded by
  ``(seed, e)``; any position can be looked up without replaying earlier epochs.
- :class:`ResumableBatchSampler` gives rank ``r`` of ``W`` the positions ``r, r + W, ...``
  (like ``TrainingSampler``) in batches, starting at batch ``start_batch``; with aspect-ratio
  grouping it replays the grouping from position 0 (index arithmetic only, no image is read).
- :class:`_PositionDataset` maps position ``p`` with Python/NumPy/torch-CPU random state seeded
  by ``(seed, p, attempt)``, so augmentation randomness does not depend on which worker maps
  the sample. A record whose mapper raises is replaced by a record drawn from the same seed, and
  the replaced record travels with the sample to the main process (``validation``).
- :class:`ResumableTrainLoader` builds the ``DataLoader`` lazily, when iteration starts, so the
  Trainer can set ``start_iter`` (and the seed stored in a checkpoint) after ``resume_or_load``.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import random
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import numpy as np
import torch
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

from .validation import FAILED_KEY, SKIPPED_KEY, BadSampleTracker
from .workers import keep_freed_memory

logger = logging.getLogger(__name__)

# Replacement attempts for one sample before the run is stopped (see BadSampleTracker.consume).
MAX_ATTEMPTS = 10


def derive_seed(*values: int) -> int:
    """A 32-bit seed that depends on every value (NumPy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's CPU random state for a block, then restore them.

    Restoring keeps a mapper running in the main process (``NUM_WORKERS 0``) from changing the
    random state the model uses (dropout). CUDA generators are not touched.
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    torch_state = torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class SampleStream:
    """Global sample order: position -> dataset index, epoch by epoch, seeded by (seed, epoch)."""

    def __init__(self, size: int, seed: int, repeat_factors: Sequence[float] | None = None):
        if size <= 0:
            raise ValueError("the training dataset is empty")
        self.size, self.seed = size, int(seed)
        self.repeat_factors = (
            None if repeat_factors is None else torch.as_tensor(repeat_factors, dtype=torch.float64)
        )
        self._cache: dict[int, np.ndarray] = {}
        self._epoch_starts = [0]  # cumulative epoch lengths (they vary with repeat factors)

    def epoch_indices(self, epoch: int) -> np.ndarray:
        if epoch not in self._cache:
            g = torch.Generator()
            g.manual_seed(derive_seed(self.seed, epoch))
            if self.repeat_factors is None:
                base = torch.arange(self.size)
            else:
                # Stochastic rounding, as in Detectron2's RepeatFactorTrainingSampler.
                whole = torch.floor(self.repeat_factors)
                extra = torch.rand(self.size, generator=g, dtype=torch.float64) < (
                    self.repeat_factors - whole
                )
                base = torch.repeat_interleave(torch.arange(self.size), (whole + extra).long())
            order = base[torch.randperm(len(base), generator=g)].numpy()
            if len(self._cache) >= 2:  # workers move forward; keep the current and next epoch
                self._cache.pop(min(self._cache))
            self._cache[epoch] = order
        return self._cache[epoch]

    def locate(self, position: int) -> tuple[int, int]:
        """(epoch, offset in the epoch) of a global position."""
        if self.repeat_factors is None:
            return divmod(position, self.size)
        while self._epoch_starts[-1] <= position:
            epoch = len(self._epoch_starts) - 1
            self._epoch_starts.append(self._epoch_starts[-1] + len(self.epoch_indices(epoch)))
        epoch = bisect.bisect_right(self._epoch_starts, position) - 1
        return epoch, position - self._epoch_starts[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = self.locate(position)
        return int(self.epoch_indices(epoch)[offset])


class ResumableBatchSampler:
    """Batches of global positions for one rank, starting at batch ``start_batch``."""

    def __init__(
        self,
        stream: SampleStream,
        batch_size: int,
        rank: int,
        world_size: int,
        group_ids: np.ndarray | None = None,
    ):
        self.stream, self.batch_size = stream, batch_size
        self.rank, self.world_size = rank, world_size
        self.group_ids = group_ids
        self.start_batch = 0

    def _positions(self) -> Iterator[int]:
        p = self.rank
        while True:
            yield p
            p += self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        return self._plain() if self.group_ids is None else self._grouped()

    def _plain(self) -> Iterator[list[int]]:
        b = self.start_batch
        while True:
            first = b * self.batch_size
            yield [(first + i) * self.world_size + self.rank for i in range(self.batch_size)]
            b += 1

    def _grouped(self) -> Iterator[list[int]]:
        # Aspect-ratio grouping (as Detectron2's AspectRatioGroupedDataset: landscape vs not)
        # carries partial buckets from batch to batch, so the state at batch k is recomputed by
        # replaying the grouping from position 0.
        buckets: dict[int, list[int]] = {}
        emitted = 0
        for p in self._positions():
            bucket = buckets.setdefault(int(self.group_ids[self.stream.index_at(p)]), [])
            bucket.append(p)
            if len(bucket) == self.batch_size:
                if emitted >= self.start_batch:
                    yield list(bucket)
                emitted += 1
                bucket.clear()


class _PositionDataset(torch.utils.data.Dataset):
    """Maps a global position to a sample with position-seeded randomness; replaces bad records."""

    def __init__(
        self,
        records: DatasetFromList,
        mapper: Callable[[dict], Any],
        stream: SampleStream,
        seed: int,
    ):
        self.records, self.mapper, self.stream, self.seed = records, mapper, stream, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, position: int) -> dict:
        index = self.stream.index_at(position)
        skipped: list[tuple[str, str]] = []
        first_traceback = None
        for attempt in range(MAX_ATTEMPTS):
            record = self.records[index]
            with seeded_rng(derive_seed(self.seed, position, attempt)):
                try:
                    out = self.mapper(record)
                    reason = "the mapper returned None"
                except Exception as e:  # any failure of one record is a bad sample (policy)
                    out, reason = None, f"{type(e).__name__}: {e}"
                    first_traceback = first_traceback or traceback.format_exc(limit=8)
            if out is not None:
                if skipped:
                    out[SKIPPED_KEY] = skipped
                return out
            skipped.append((str(record.get("file_name", f"record #{index}")), reason))
            # A replacement drawn from (seed, position, attempt): the same in every run.
            index = int(np.random.default_rng([self.seed, position, attempt]).integers(len(self)))
        return {FAILED_KEY: skipped, "traceback": first_traceback or ""}


class ResumableTrainLoader:
    """An iterable of training batches (lists of dicts) that can start at any iteration.

    Attributes set before iteration starts take effect: ``start_iter`` (the Trainer sets it after
    resuming) and ``seed`` (restored from the checkpoint, so a run started with ``SEED -1``
    resumes with the seed it drew).
    """

    def __init__(
        self,
        records: Sequence[dict],
        mapper: Callable[[dict], Any],
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        repeat_factors: Sequence[float] | None = None,
        group_ids: Sequence[int] | None = None,
        tracker: BadSampleTracker | None = None,
    ):
        self.records = DatasetFromList(list(records), copy=True, serialize=True)
        self.mapper = mapper
        self.batch_size, self.num_workers = batch_size, num_workers
        self.seed = int(seed)
        self.repeat_factors = repeat_factors
        self.group_ids = None if group_ids is None else np.asarray(group_ids, dtype=np.int64)
        self.tracker = tracker or BadSampleTracker(len(self.records), 1.0)
        self.start_iter = 0

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, **self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        self.tracker.load_state_dict(state)

    def __iter__(self) -> Iterator[list[dict]]:
        stream = SampleStream(len(self.records), self.seed, self.repeat_factors)
        sampler = ResumableBatchSampler(
            stream, self.batch_size, comm.get_rank(), comm.get_world_size(), self.group_ids
        )
        sampler.start_batch = self.start_iter
        loader = torch.utils.data.DataLoader(
            _PositionDataset(self.records, self.mapper, stream, self.seed),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            # Without its own generator, creating the iterator would draw from torch's global
            # generator and shift the dropout masks of a resumed run.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=keep_freed_memory,
        )
        for batch in loader:
            yield self.tracker.consume(batch)


def per_process_batch_and_seed(cfg) -> tuple[int, int]:
    """``SOLVER.IMS_PER_BATCH`` split over the processes, and the loader's seed. A seed drawn
    here (``SEED`` < 0) is the same on every rank and is stored in checkpoints, so a resumed
    run reuses it."""
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(
            f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible by the number "
            f"of processes ({world})"
        )
    seed = cfg.SEED if cfg.SEED >= 0 else comm.shared_random_seed()
    return cfg.SOLVER.IMS_PER_BATCH // world, seed
