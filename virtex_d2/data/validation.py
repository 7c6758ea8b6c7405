"""Checks on training data before and during training, and the bad-sample policy.

Policy (see README "Failure behaviour"):

- Before training, every training record's image file is ``stat``-ed
  (``DATALOADER.VIRTEX_CHECK_FILES``); missing and zero-byte files are dropped and counted as bad.
- During training, a record whose mapper raises (corrupt/truncated image, size mismatch, ...) is
  replaced by another record and counted as bad (``data.resumable``). Skip information travels
  with the sample to the main process, where :class:`BadSampleTracker` counts it.
- Once more distinct records are bad than ``DATALOADER.VIRTEX_MAX_BAD_FRACTION`` x dataset size,
  the run stops with :class:`BadDataError` naming the files and the fix.
- Instance annotations are cleaned once, in the main process (:func:`clean_instance_annotations`):
  degenerate boxes are dropped, boxes and polygons are clipped to the image, invalid polygons
  are dropped (and, for Mask R-CNN, annotations left without a mask); every kind of change is
  counted and logged.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from detectron2.structures import BoxMode

logger = logging.getLogger(__name__)

# Keys a sample dict carries from a data-loader worker to the main process.
SKIPPED_KEY = "_virtex_skipped"  # [(file_name, reason), ...] records replaced by this sample
FAILED_KEY = "_virtex_failed"  # present (instead of a sample) when every replacement failed

# How many bad records a log line or an error message names.
_EXAMPLES = 5


class BadDataError(RuntimeError):
    """Training data is unusable beyond the configured tolerance; the message says what to fix."""


def _examples(bad: Mapping[str, str], limit: int = _EXAMPLES) -> str:
    items = list(bad.items())[:limit]
    lines = [f"  {name}: {reason}" for name, reason in items]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def max_bad_records(dataset_size: int, max_fraction: float) -> int:
    """How many distinct bad records a dataset of ``dataset_size`` may have."""
    if not 0.0 <= max_fraction <= 1.0:
        raise ValueError(
            f"DATALOADER.VIRTEX_MAX_BAD_FRACTION must be in [0, 1], got {max_fraction}"
        )
    return int(math.floor(max_fraction * dataset_size))


def _too_many_message(bad: Mapping[str, str], dataset_size: int, max_fraction: float) -> str:
    return (
        f"{len(bad)} of the {dataset_size} training records are unusable, more than "
        f"DATALOADER.VIRTEX_MAX_BAD_FRACTION = {max_fraction} allows "
        f"({max_bad_records(dataset_size, max_fraction)}):\n{_examples(bad)}\n"
        "Fix or re-download those files (or remove them from the annotation json), or raise "
        "DATALOADER.VIRTEX_MAX_BAD_FRACTION to train without them."
    )


def check_image_files(
    records: Sequence[dict], dataset_size: int | None = None, max_fraction: float = 1.0
) -> tuple[list[dict], dict[str, str]]:
    """Drop records whose ``file_name`` is missing or empty (0 bytes).

    Only ``stat`` is called (no decoding), so this is cheap enough for COCO-sized datasets.

    Returns:
        (kept records, {file_name: reason} for the dropped ones).

    Raises:
        BadDataError: when more records are bad than ``max_fraction`` allows.
    """
    kept, bad = [], {}
    for r in records:
        path = r.get("file_name")
        if not isinstance(path, str) or not path:
            bad[f"record image_id={r.get('image_id')}"] = "no file_name"
            continue
        try:
            size = os.stat(path).st_size
        except OSError as e:
            bad[path] = f"cannot stat: {e.strerror or e}"
            continue
        if size == 0:
            bad[path] = "empty file (0 bytes)"
            continue
        kept.append(r)
    size = len(records) if dataset_size is None else dataset_size
    if bad:
        logger.warning(
            "%d of %d training image files are missing or empty and are skipped:\n%s",
            len(bad),
            size,
            _examples(bad),
        )
        if len(bad) > max_bad_records(size, max_fraction):
            raise BadDataError(_too_many_message(bad, size, max_fraction))
    return kept, bad


class BadSampleTracker:
    """Counts the records replaced during training, in the main process, and enforces the limit.

    Workers cannot share Python counters, so each sample dict carries the records it replaced
    under :data:`SKIPPED_KEY`; :meth:`consume` strips that key before the model sees the batch.
    """

    def __init__(self, dataset_size: int, max_fraction: float, initial: Mapping[str, str] = ()):
        self.dataset_size = dataset_size
        self.max_fraction = max_fraction
        self.limit = max_bad_records(dataset_size, max_fraction)
        self.bad: dict[str, str] = dict(initial)  # distinct bad records -> first reason
        self.replacements = 0  # samples replaced in this process (a bad record can recur)

    def state_dict(self) -> dict[str, Any]:
        return {"bad_files": list(self.bad), "bad_reasons": list(self.bad.values())}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, reason in zip(state.get("bad_files", []), state.get("bad_reasons", [])):
            self.bad.setdefault(name, reason)

    def consume(self, batch: list[dict]) -> list[dict]:
        """Strip the skip information from ``batch``, count it, and raise if over the limit."""
        for d in batch:
            if FAILED_KEY in d:
                attempts = d[FAILED_KEY]
                raise BadDataError(
                    f"{len(attempts)} records in a row failed to load, so this is not a few bad "
                    "files but a problem with the data or the mapper. The errors were:\n"
                    + _examples(dict(attempts), limit=len(attempts))
                    + "\nThe first traceback:\n"
                    + d.get("traceback", "(none)")
                )
            for name, reason in d.pop(SKIPPED_KEY, ()):
                self.replacements += 1
                if name not in self.bad:
                    self.bad[name] = reason
                    logger.warning(
                        "Skipped training record %s: %s (%d distinct bad record(s) so far, at "
                        "most %d allowed)",
                        name,
                        reason,
                        len(self.bad),
                        self.limit,
                    )
        if len(self.bad) > self.limit:
            raise BadDataError(_too_many_message(self.bad, self.dataset_size, self.max_fraction))
        return batch


# ---------------------------------------------------------------------------- instance json
def _finite(values: Iterable[Any]) -> bool:
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _clean_polygons(segm: list, width: float, height: float, counts: Counter) -> list:
    polygons = []
    for poly in segm:
        if (
            not isinstance(poly, (list, tuple))
            or len(poly) < 6
            or len(poly) % 2
            or not _finite(poly)
        ):
            counts["polygons dropped (fewer than 3 points, odd length or non-numeric)"] += 1
            continue
        clipped = [
            min(max(float(v), 0.0), width if i % 2 == 0 else height) for i, v in enumerate(poly)
        ]
        if clipped != [float(v) for v in poly]:
            counts["polygons clipped to the image"] += 1
        polygons.append(clipped)
    return polygons


def _clean_annotation(
    ann: dict, width: float, height: float, require_mask: bool, counts: Counter
) -> dict | None:
    """The cleaned annotation, or None to drop it."""
    box = ann.get("bbox")
    if box is None or len(box) != 4 or not _finite(box):
        counts["annotations dropped: missing or non-numeric bbox"] += 1
        return None
    mode = ann.get("bbox_mode", BoxMode.XYWH_ABS)
    if mode not in (BoxMode.XYWH_ABS, BoxMode.XYXY_ABS):
        return ann  # relative or rotated boxes: left to Detectron2
    x0, y0, a, b = (float(v) for v in box)
    x1, y1 = (x0 + a, y0 + b) if mode == BoxMode.XYWH_ABS else (a, b)
    if x1 <= x0 or y1 <= y0:
        counts["annotations dropped: degenerate box (width or height <= 0)"] += 1
        return None
    cx0, cy0 = min(max(x0, 0.0), width), min(max(y0, 0.0), height)
    cx1, cy1 = min(max(x1, 0.0), width), min(max(y1, 0.0), height)
    if cx1 <= cx0 or cy1 <= cy0:
        counts["annotations dropped: box entirely outside the image"] += 1
        return None
    ann = dict(ann)
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        counts["boxes clipped to the image"] += 1
        ann["bbox"] = (
            [cx0, cy0, cx1 - cx0, cy1 - cy0] if mode == BoxMode.XYWH_ABS else [cx0, cy0, cx1, cy1]
        )
    segm = ann.get("segmentation")
    if isinstance(segm, list):
        polygons = _clean_polygons(segm, width, height, counts)
        if polygons:
            ann["segmentation"] = polygons
        else:
            ann.pop("segmentation")
    if require_mask and not ann.get("segmentation"):
        # Detectron2 reads masks only if the first annotation of an image has one; a mix
        # fails with KeyError and a missing mask fails the mask loss.
        counts["annotations dropped: no valid mask (empty or invalid polygons)"] += 1
        return None
    return ann


def clean_instance_annotations(
    records: Sequence[dict], filter_empty: bool, require_mask: bool = False
) -> tuple[list[dict], Counter]:
    """Make instance annotations safe for Detectron2's mapper, counting every change.

    - boxes with width or height <= 0 (or missing / NaN coordinates) are dropped;
    - boxes are clipped to the image (``width``/``height`` of the record); a box entirely
      outside it is dropped;
    - polygons with fewer than 3 points, odd length or non-numeric values are dropped, the
      others clipped to the image; with ``require_mask`` (Mask R-CNN), an annotation left
      without a mask (polygons or RLE) is dropped;
    - with ``filter_empty``, images left without non-crowd annotations are dropped.

    Records without ``annotations`` (e.g. caption records) are kept unchanged.
    """
    counts: Counter = Counter()
    out = []
    for r in records:
        anns = r.get("annotations")
        if anns is None:
            out.append(r)
            continue
        width, height = r.get("width"), r.get("height")
        if not _finite((width, height)) or width <= 0 or height <= 0:
            raise BadDataError(
                f"record {r.get('file_name')} has no valid width/height ({width}, {height}); "
                "the instances json's 'images' entries need positive width and height"
            )
        cleaned = [
            _clean_annotation(a, float(width), float(height), require_mask, counts) for a in anns
        ]
        cleaned = [a for a in cleaned if a is not None]
        if filter_empty and not any(a.get("iscrowd", 0) == 0 for a in cleaned):
            counts["images dropped: no usable non-crowd annotation"] += 1
            continue
        out.append({**r, "annotations": cleaned})
    if counts:
        logger.warning(
            "Cleaned the training annotations:\n%s",
            "\n".join(f"  {n} {what}" for what, n in sorted(counts.items())),
        )
    return out, counts
