"""A resumable training loader streaming WebDataset shards (``webdataset:<pattern>`` datasets).

The order of samples is a function of (seed, rank, stream) only, and a run resumed from a
checkpoint continues exactly where the uninterrupted run would be:

- Each rank runs ``L = max(1, DATALOADER.NUM_WORKERS)`` *streams*. Iteration ``i`` takes its
  batch from stream ``i % L`` (a data-loader worker yields whole batches, and PyTorch's loader
  takes them from the workers in turn); after a resume at iteration ``s``, worker ``w`` serves
  stream ``(s + w) % L``, so iteration ``i`` still comes from stream ``i % L``.
- A stream reads, in epoch ``e``, the shards :func:`shards.assigned_shards` gives its slot
  (disjoint across ranks and streams), each shard through a shuffle buffer (webdataset's) seeded
  by (seed, epoch, shard); augmentation randomness is seeded by (seed, epoch, shard, offset).
- Its position is ``(epoch, shard ordinal, samples read from that shard)``. Every batch carries
  the position after it to the main process; at checkpoint iterations the positions of every
  rank are gathered (``engine.hooks.StreamStateHook``) and saved. Resuming re-reads at most one
  shard per stream up to the saved offset, without decoding images.

Bad samples (undecodable image, missing or empty caption, an unreadable shard) are skipped and
counted with the policy of ``validation``: the next sample of the stream takes the place of a
bad one; ``MAX_ATTEMPTS`` bad samples in a row stop the run. The dataset size is not known in
advance, so ``DATALOADER.VIRTEX_MAX_BAD_FRACTION`` applies to the samples read so far, once
at least ``1 / fraction`` of them have been read (before that one bad sample would exceed it).
"""

from __future__ import annotations

import logging
import random
import traceback
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

import torch
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm

from .resumable import MAX_ATTEMPTS, derive_seed, per_process_batch_and_seed, seeded_rng
from .shards import (
    assigned_shards,
    check_enough_shards,
    expand_shards,
    is_webdataset_name,
    sample_to_record,
)
from .validation import FAILED_KEY, SKIPPED_KEY, BadSampleTracker, max_bad_records
from .workers import keep_freed_memory

logger = logging.getLogger(__name__)

Position = tuple[int, int, int]  # (epoch, shard ordinal within the stream's epoch, offset)


class StreamBadSampleTracker(BadSampleTracker):
    """:class:`BadSampleTracker` whose dataset size is the number of samples read so far."""

    def __init__(self, max_fraction: float):
        super().__init__(0, max_fraction)
        self.read = 0

    def consume_read(self, batch: list[dict], read: int) -> list[dict]:
        self.read += read
        self.dataset_size = self.read
        f = self.max_fraction
        judged = f == 0 or self.read * f >= 1
        self.limit = max_bad_records(self.read, f) if judged else len(self.bad) + 1
        return self.consume(batch)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "read": self.read}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.read = int(state.get("read", 0))


class ShardStream:
    """The samples of one stream of one rank: raw webdataset samples with their positions."""

    def __init__(
        self, urls: Sequence[str], seed: int, slot: int, num_slots: int, shuffle_buffer: int
    ):
        self.urls, self.seed = list(urls), int(seed)
        self.slot, self.num_slots = slot, num_slots
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.shard_errors: list[tuple[str, str]] = []  # filled by the webdataset handler

    def _handler(self, url: str) -> Callable[[Exception], bool]:
        def handle(exn: Exception) -> bool:
            detail = exn.args[0] if exn.args else exn
            self.shard_errors.append((url, f"{type(exn).__name__}: {detail}"))
            return True  # go on with the next member / shard: counted as a bad record

        return handle

    def shard_samples(self, epoch: int, shard: int) -> Iterator[dict]:
        """The raw samples of one shard in the order of its seeded shuffle buffer."""
        from webdataset.filters import _shuffle
        from webdataset.tariterators import tarfile_samples

        url = self.urls[shard]
        raw = tarfile_samples(iter([{"url": url}]), handler=self._handler(url))
        rng = random.Random(derive_seed(self.seed, epoch, shard))
        return _shuffle(iter(raw), self.shuffle_buffer, self.shuffle_buffer, rng=rng)

    def __call__(self, start: Position) -> Iterator[tuple[dict, Position, int]]:
        """(raw sample, position after it, shard index) from ``start`` on, epoch after epoch."""
        epoch, ordinal, offset = start
        while True:
            mine = assigned_shards(len(self.urls), self.seed, epoch, self.slot, self.num_slots)
            whole_epoch, read = (ordinal, offset) == (0, 0), 0
            while ordinal < len(mine):
                shard = mine[ordinal]
                for k, sample in enumerate(self.shard_samples(epoch, shard)):
                    if k >= offset:  # samples before the offset were used before a resume
                        read += 1
                        yield sample, (epoch, ordinal, k + 1), shard
                ordinal, offset = ordinal + 1, 0
            if whole_epoch and read == 0:
                # Not one sample in all of this stream's shards: stop instead of spinning.
                names = [self.urls[i] for i in mine]
                why = list(self.shard_errors) or [(u, "no samples in the shard") for u in names]
                yield {FAILED_KEY: why}, (epoch, ordinal, 0), -1
                return
            epoch, ordinal = epoch + 1, 0


class _StreamingDataset(torch.utils.data.IterableDataset):
    """Yields ``{"stream", "position", "read", "samples"}``: one batch of one stream."""

    def __init__(
        self,
        urls: Sequence[str],
        mapper: Callable[[dict], Any],
        *,
        seed: int,
        rank: int,
        world_size: int,
        streams: int,
        batch_size: int,
        shuffle_buffer: int,
        positions: Sequence[Position],
        start_iter: int,
    ):
        self.urls, self.mapper, self.seed = list(urls), mapper, int(seed)
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self.batch_size, self.shuffle_buffer = batch_size, shuffle_buffer
        self.positions, self.start_iter = [tuple(p) for p in positions], start_iter

    def _map(self, sample: dict, position: Position, shard: int) -> dict:
        epoch, _, offset = position
        with seeded_rng(derive_seed(self.seed, epoch, shard, offset)):
            return self.mapper(sample_to_record(sample))

    def batches(self, stream: int) -> Iterator[dict]:
        source = ShardStream(
            self.urls,
            self.seed,
            self.rank * self.streams + stream,
            self.world_size * self.streams,
            self.shuffle_buffer,
        )
        samples: list[dict] = []
        skipped: list[tuple[str, str]] = []
        read, failures, first_error = 0, 0, ""
        for sample, position, shard in source(self.positions[stream]):
            if FAILED_KEY in sample:
                yield {"stream": stream, "position": position, "read": read, "samples": [sample]}
                return
            read += 1
            name = f"{self.urls[shard]}#{sample.get('__key__')}"
            try:
                out = self._map(sample, position, shard)
            except Exception as e:  # any failure of one sample is a bad sample (policy)
                out = None
                skipped.append((name, f"{type(e).__name__}: {e}"))
                first_error = first_error or traceback.format_exc(limit=8)
            skipped += source.shard_errors
            source.shard_errors.clear()
            if out is None:
                failures += 1
                if failures >= MAX_ATTEMPTS:
                    failed = {FAILED_KEY: skipped[-MAX_ATTEMPTS:], "traceback": first_error}
                    yield {
                        "stream": stream,
                        "position": position,
                        "read": read,
                        "samples": [failed],
                    }
                    return
                continue
            failures = 0
            if skipped:
                out[SKIPPED_KEY], skipped = skipped, []
            samples.append(out)
            if len(samples) == self.batch_size:
                yield {"stream": stream, "position": position, "read": read, "samples": samples}
                samples, read = [], 0

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        if info is None:  # NUM_WORKERS 0: one stream, in this process
            return self.batches(0)
        return self.batches((self.start_iter + info.id) % self.streams)


class StreamingTrainLoader:
    """Iterable of training batches (lists of mapped dicts) from shards; resumable.

    Same interface as ``ResumableTrainLoader`` for the Trainer: ``start_iter``, ``seed``,
    ``tracker``, ``state_dict``/``load_state_dict``; plus ``rank_state`` and ``gathered``, which
    carry every rank's stream positions into rank 0's checkpoint.
    """

    def __init__(
        self,
        urls: Sequence[str],
        mapper: Callable[[dict], Any],
        *,
        batch_size: int,
        num_workers: int,
        seed: int,
        max_bad_fraction: float,
        shuffle_buffer: int,
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.urls, self.mapper = list(urls), mapper
        self.batch_size, self.num_workers = batch_size, num_workers
        self.streams = max(1, num_workers)
        self.seed, self.shuffle_buffer = int(seed), shuffle_buffer
        self.rank = comm.get_rank() if rank is None else rank
        self.world_size = comm.get_world_size() if world_size is None else world_size
        check_enough_shards(len(self.urls), self.world_size, self.streams)
        self.tracker = StreamBadSampleTracker(max_bad_fraction)
        self.positions: list[Position] = [(0, 0, 0)] * self.streams
        self.gathered: list[dict] | None = None
        self.start_iter = 0

    def rank_state(self) -> dict[str, Any]:
        """This rank's stream positions and bad-sample record."""
        return {"positions": [list(p) for p in self.positions], **self.tracker.state_dict()}

    def state_dict(self) -> dict[str, Any]:
        ranks = self.gathered if self.gathered is not None else [self.rank_state()]
        return {"seed": self.seed, "ranks": ranks, **self.tracker.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        ranks = state.get("ranks")
        if ranks is None:
            raise ValueError(
                "this checkpoint has no shard positions (it was not written by a "
                "run on webdataset shards); start without --resume"
            )
        positions = ranks[self.rank]["positions"] if len(ranks) == self.world_size else []
        if len(positions) != self.streams:
            raise ValueError(
                f"the checkpoint holds the shard positions of {len(ranks)} process(es) x "
                f"{len(ranks[0]['positions'])} stream(s), this run has {self.world_size} x "
                f"{self.streams}: resume with the same number of processes and "
                "DATALOADER.NUM_WORKERS (or start a new run from the weights with MODEL.WEIGHTS)"
            )
        self.seed = int(state["seed"])
        self.positions = [tuple(int(v) for v in p) for p in positions]
        self.tracker.load_state_dict(ranks[self.rank])

    def __iter__(self) -> Iterator[list[dict]]:
        dataset = _StreamingDataset(
            self.urls,
            self.mapper,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            streams=self.streams,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            positions=self.positions,
            start_iter=self.start_iter,
        )
        loader = torch.utils.data.DataLoader(
            # The dataset yields whole batches; the collator passes them through untouched.
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            collate_fn=trivial_batch_collator,
            # See ResumableTrainLoader: keep torch's global generator (dropout) untouched.
            generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=keep_freed_memory,
        )
        for item in loader:
            self.positions[item["stream"]] = tuple(item["position"])
            yield self.tracker.consume_read(item["samples"], item["read"])


def build_streaming_train_loader(cfg, mapper: Callable[[dict], Any]) -> StreamingTrainLoader:
    """The loader of ``cfg``'s ``webdataset:`` training sets (all entries must be such)."""
    names = list(cfg.DATASETS.TRAIN)
    others = [n for n in names if not is_webdataset_name(n)]
    if others:
        raise ValueError(
            f"DATASETS.TRAIN mixes WebDataset shards with the datasets {others}; shards are "
            "streamed on their own (write those datasets into shards with "
            "datasets/make_shards.py and list both shard patterns)"
        )
    urls = expand_shards(names)
    batch_size, seed = per_process_batch_and_seed(cfg)
    logger.info("Streaming %d shard(s) of %s", len(urls), names)
    return StreamingTrainLoader(
        urls,
        mapper,
        batch_size=batch_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
        seed=seed,
        max_bad_fraction=cfg.DATALOADER.VIRTEX_MAX_BAD_FRACTION,
        shuffle_buffer=cfg.DATALOADER.VIRTEX_SHUFFLE_BUFFER,
    )
