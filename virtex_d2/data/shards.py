"""WebDataset shards as caption data: naming, listing and assigning shards, parsing samples.

A training set named ``webdataset:<pattern>`` in ``DATASETS.TRAIN`` is a set of tar shards as
img2dataset (or ``datasets/make_shards.py``) writes them: each sample is an image
(``jpg``/``jpeg``/``png``/``webp``) with its caption(s) in ``json`` (``captions`` list and/or
``caption`` string) or ``txt``. ``<pattern>`` is a brace pattern
(``/data/cc3m/{00000..00331}.tar``), a glob (``/data/cc3m/*.tar``), a single file, or several of
these joined by ``::``; ``pipe:`` and ``http(s)://`` URLs are passed to webdataset as they are.

Shard assignment (:func:`assigned_shards`): in epoch ``e`` the shard list is permuted by
``(seed, e)`` and slot ``s`` of ``S = world_size x streams`` takes every ``S``-th shard from
position ``s``, so in every epoch each shard is read by exactly one stream of one rank.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .validation import BadDataError

PREFIX = "webdataset:"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_REMOTE = ("pipe:", "http://", "https://", "s3://", "gs://", "ais://")


def is_webdataset_name(name: str) -> bool:
    return name.startswith(PREFIX)


def _expand_one(pattern: str) -> list[str]:
    from webdataset.shardlists import expand_urls  # brace expansion (braceexpand), WDS_ env vars

    urls: list[str] = []
    for url in expand_urls(pattern):
        if url.startswith(_REMOTE):
            urls.append(url)
        elif glob.has_magic(url):
            urls.extend(sorted(glob.glob(url)))
        else:
            urls.append(url)
    return urls


def expand_shards(names: Sequence[str]) -> list[str]:
    """Shard URLs of ``webdataset:`` training-set names, in the order given (no duplicates).

    Local shards are checked now, so a typo in a pattern stops the run before training.

    Raises:
        BadDataError: a pattern matches nothing, or local shards are missing or empty.
    """
    urls: list[str] = []
    for name in names:
        pattern = name[len(PREFIX) :] if is_webdataset_name(name) else name
        found = _expand_one(pattern)
        if not found:
            raise BadDataError(
                f"DATASETS.TRAIN entry {name!r} matches no shard. Give a brace pattern "
                "(DIR/{00000..00099}.tar), a glob (DIR/*.tar) or a file; write shards with "
                "datasets/make_shards.py."
            )
        urls.extend(u for u in found if u not in urls)
    bad = []
    for url in urls:
        if url.startswith(_REMOTE):
            continue
        try:
            if os.stat(url).st_size == 0:
                bad.append(f"{url}: empty file (0 bytes)")
        except OSError as e:
            bad.append(f"{url}: {e.strerror or e}")
    if bad:
        shown = "\n".join(f"  {b}" for b in bad[:10])
        more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
        raise BadDataError(
            f"{len(bad)} of the {len(urls)} training shards cannot be read:\n{shown}{more}\n"
            "Fix the pattern in DATASETS.TRAIN (brace ranges must name existing files) or "
            "re-write those shards."
        )
    return urls


def assigned_shards(num_shards: int, seed: int, epoch: int, slot: int, num_slots: int) -> list[int]:
    """Indices of the shards that ``slot`` (= rank x streams + stream) reads in ``epoch``."""
    from .resumable import derive_seed

    order = np.random.default_rng(derive_seed(seed, epoch, 0x5A4D)).permutation(num_shards)
    return [int(i) for i in order[slot::num_slots]]


def check_enough_shards(num_shards: int, world_size: int, streams: int) -> None:
    """Every (rank, data-loader worker) needs at least one shard, or it would have no data."""
    if num_shards < world_size * streams:
        raise BadDataError(
            f"{num_shards} shard(s) cannot feed {world_size} process(es) x {streams} data-loader "
            f"stream(s) (DATALOADER.NUM_WORKERS, at least 1): each needs at least one shard of "
            "its own. Write more, smaller shards (datasets/make_shards.py --samples-per-shard) "
            "or lower DATALOADER.NUM_WORKERS."
        )


def _text(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


def sample_to_record(sample: dict[str, Any]) -> dict[str, Any]:
    """A raw webdataset sample (``__key__``, ``__url__``, extension -> bytes) as a caption record
    for ``CaptionDatasetMapper``: ``{"file_name": "<shard>#<key>", "image_id": key,
    "image_bytes": bytes, "captions": [str, ...]}``.

    Raises:
        ValueError: no image, or no non-empty caption (the loader counts the sample as bad).
    """
    name = f"{sample.get('__url__', '?')}#{sample.get('__key__', '?')}"
    image = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if image is None:
        raise ValueError(
            f"no image ({'/'.join(IMAGE_KEYS)}) in the sample; it has "
            f"{sorted(k for k in sample if not k.startswith('__'))}"
        )
    captions: list[Any] = []
    if "json" in sample:
        try:
            meta = json.loads(_text(sample["json"]))
        except json.JSONDecodeError as e:
            raise ValueError(f"its json is not valid: {e}") from e
        if isinstance(meta, dict):
            listed = meta.get("captions")
            captions = list(listed) if isinstance(listed, list) else [meta.get("caption")]
    if not any(isinstance(c, str) and c.strip() for c in captions) and "txt" in sample:
        captions = [_text(sample["txt"])]
    captions = [c.strip() for c in captions if isinstance(c, str) and c.strip()]
    if not captions:
        raise ValueError("missing or empty caption (json 'caption'/'captions' or txt)")
    return {
        "file_name": name,
        "image_id": str(sample.get("__key__")),
        "image_bytes": image,
        "captions": captions,
    }


def sample_keys(samples: Iterable[dict]) -> list[str]:
    """``<shard>#<key>`` names of mapped samples (for logs and tests)."""
    return [s["file_name"] for s in samples]
