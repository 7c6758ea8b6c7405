#!/usr/bin/env python
"""Per-image CPU cost of the pretraining mapper against a reference-style pipeline, one thread.

Each image is mapped by every system in turn (the order rotates from image to image), so load
from other processes on a shared machine hits all of them alike; the median milliseconds per
image of each system are printed, with the ratio to the reference-style pipeline.

Systems:

- ``ours``: ``CaptionDatasetMapper`` in train mode with the default config (random-resized crop
  to ``--crop`` px with scale (0.2, 1) and ratio (3/4, 4/3), antialiased; flip p=0.5 with the
  left/right caption swap; colour jitter 0.4/0.4/0.4/0.1 with p=0.8; bicaptioning tokens).
- ``ours, RESIZE_ANTIALIAS False``: the same with the reference's resize (no antialiasing).
- ``reference-style``: what the reference VirTex dataset does per image (``cv2.imread`` and
  BGR->RGB, albumentations' random-resized crop = slice + ``cv2.resize`` INTER_LINEAR,
  ``cv2.flip``, its ColorJitter = brightness/contrast table + HSV shift with OpenCV, caption
  choice, substring left/right swap, tokenization, uint8 tensor), written with cv2/numpy so that
  albumentations is not needed. It skips albumentations' per-call bookkeeping and the
  reference's float ``Normalize``, so it is faster than the reference itself: the baseline.
- ``reference-style + Normalize``: the same, also with the reference's float ``Normalize`` and
  float tensor (this mapper returns uint8 and the model normalises on the GPU).
- ``albumentations X``: only where albumentations is importable: the reference as written, an
  albumentations ``Compose`` of ``RandomResizedCrop``, ``HorizontalFlip``, its own
  ``ColorJitter`` (standing in for the reference's) and ``Normalize``, a float tensor, and the
  same caption steps.

    python tools/benchmarks/benchmark_mapper.py [--images DIR] [--rounds 6] [--crop 224]

albumentations is not a dependency; to add its column without touching the environment:
``pip install --target /tmp/alb --no-deps albumentations==2.0.8 albucore==0.0.24 pydantic
pydantic-core typing-inspection annotated-types stringzilla simsimd`` and run with
``PYTHONPATH=/tmp/alb``.

Default data: the 80 real COCO photos of ../shared/data/coco_tiny/train2017, each with COCO
captions (the 17 captioned ones keep theirs; the rest borrow them in turn).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO_TINY = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")


def _records(images: str, captions_json: str) -> list[dict]:
    with open(captions_json) as f:
        data = json.load(f)
    by_name = {i["file_name"]: i["id"] for i in data["images"]}
    caps: dict[int, list[str]] = {}
    for a in data["annotations"]:
        caps.setdefault(a["image_id"], []).append(a["caption"])
    pool = list(caps.values())
    files = sorted(glob.glob(os.path.join(images, "*.jpg")))
    if not files:
        raise SystemExit(f"no .jpg files in {images}")
    return [
        {
            "file_name": f,
            "image_id": i,
            "captions": caps.get(by_name.get(os.path.basename(f)), pool[i % len(pool)]),
        }
        for i, f in enumerate(files)
    ]


def _config(tokenizer, crop: int, antialias: bool):
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(
        os.path.join(REPO, "configs", "pretrain", "bicaptioning_R_50_L1_H2048.yaml")
    )
    cfg.MODEL.VIRTEX.TOKENIZER, cfg.MODEL.VIRTEX.VOCAB_SIZE = tokenizer.path, len(tokenizer)
    cfg.INPUT.VIRTEX.CROP_SIZE = crop
    cfg.INPUT.VIRTEX.RESIZE_ANTIALIAS = antialias
    return cfg


class ReferenceStyle:
    """The reference dataset's per-image steps with cv2/numpy (module docstring)."""

    def __init__(self, tokenizer, crop: int, max_length: int = 30):
        self.tokenizer, self.crop, self.max_length = tokenizer, crop, max_length

    def _box(self, h: int, w: int) -> tuple[int, int, int, int]:
        # albumentations' RandomResizedCrop.get_params (torchvision's rule, Python's random).
        for _ in range(10):
            area = random.uniform(0.2, 1.0) * h * w
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                return random.randint(0, w - cw), random.randint(0, h - ch), cw, ch
        side = min(h, w)
        return (w - side) // 2, (h - side) // 2, side, side

    def _jitter(self, img: np.ndarray) -> np.ndarray:
        brightness, contrast = random.uniform(0.6, 1.4), random.uniform(0.6, 1.4)
        saturation, hue = random.uniform(0.6, 1.4), random.uniform(-0.1, 0.1)
        # brightness_contrast_adjust(alpha=contrast, beta=brightness - 1) on uint8: one table.
        lut = np.arange(256, dtype=np.float32) * contrast + (brightness - 1) * np.mean(img)
        img = cv2.LUT(img, np.clip(lut, 0, 255).astype(np.uint8))
        # shift_hsv(hue_shift=int(hue * 255), sat_shift=int(saturation * 255), val_shift=0).
        h, s, v = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        ramp = np.arange(256, dtype=np.int16)
        h = cv2.LUT(h, np.mod(ramp + int(hue * 255), 180).astype(np.uint8))
        s = cv2.LUT(s, np.clip(ramp + int(saturation * 255), 0, 255).astype(np.uint8))
        return cv2.cvtColor(cv2.merge((h, s, v)), cv2.COLOR_HSV2RGB)

    def __call__(self, record: dict) -> dict:
        img = cv2.cvtColor(cv2.imread(record["file_name"]), cv2.COLOR_BGR2RGB)
        x0, y0, cw, ch = self._box(*img.shape[:2])
        img = cv2.resize(
            img[y0 : y0 + ch, x0 : x0 + cw], (self.crop, self.crop), interpolation=cv2.INTER_LINEAR
        )
        caption = random.choice(record["captions"])
        if random.random() < 0.5:
            img = cv2.flip(img, 1)
            caption = (
                caption.replace("left", "[TMP]").replace("right", "left").replace("[TMP]", "right")
            )
        if random.random() < 0.8:
            img = self._jitter(img)
        return _tensors(img, caption, self.tokenizer, self.max_length)


class ReferenceNormalized(ReferenceStyle):
    """Also the reference's last image steps: ``alb.Normalize`` (ImageNet mean and std, float32)
    and a float tensor; this mapper leaves normalisation to the model, on the GPU."""

    mean = np.float32([0.485, 0.456, 0.406]) * 255
    scale = 1 / (np.float32([0.229, 0.224, 0.225]) * 255)

    def __call__(self, record: dict) -> dict:
        out = super().__call__(record)
        image = out["image"].numpy().transpose(1, 2, 0).astype(np.float32)
        image = (image - self.mean) * self.scale
        out["image"] = torch.tensor(np.transpose(image, (2, 0, 1)), dtype=torch.float)
        return out


class Albumentations(ReferenceStyle):
    """The reference's image pipeline as an albumentations ``Compose``, Normalize and float
    tensor included (albumentations' ColorJitter stands in for the reference's own)."""

    def __init__(self, tokenizer, crop: int, alb):
        super().__init__(tokenizer, crop)
        self.transform = alb.Compose(
            [
                alb.RandomResizedCrop(size=(crop, crop), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)),
                alb.HorizontalFlip(p=0.5),
                alb.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8),
                alb.Normalize(),
            ]
        )

    def __call__(self, record: dict) -> dict:
        img = cv2.cvtColor(cv2.imread(record["file_name"]), cv2.COLOR_BGR2RGB)
        img = self.transform(image=img)["image"]
        caption = random.choice(record["captions"])  # flip detection left out: a few µs
        out = _tensors(img, caption, self.tokenizer, self.max_length)
        out["image"] = torch.tensor(np.transpose(img, (2, 0, 1)), dtype=torch.float)
        return out


def _tensors(img: np.ndarray, caption: str, tokenizer, max_length: int) -> dict:
    from virtex_d2.data.tokenizer import EOS_ID, SOS_ID

    tokens = [SOS_ID, *tokenizer.encode(caption)[: max_length - 2], EOS_ID]
    return {
        "image": torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))),
        "caption_tokens": torch.tensor(tokens),
        "noitpac_tokens": torch.tensor(tokens[::-1]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default=os.path.join(COCO_TINY, "train2017"))
    parser.add_argument(
        "--captions", default=os.path.join(COCO_TINY, "annotations", "captions_subset.json")
    )
    parser.add_argument("--rounds", type=int, default=6, help="timed passes over the images")
    parser.add_argument("--crop", type=int, default=224)
    args = parser.parse_args(argv)

    from virtex_d2.data.caption_mapper import CaptionDatasetMapper
    from virtex_d2.data.tokenizer import train_vocabulary
    from virtex_d2.data.workers import keep_freed_memory

    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    keep_freed_memory(0)  # the malloc settings of the training loaders' workers
    random.seed(0)
    np.random.seed(0)
    records = _records(args.images, args.captions)
    tokenizer = train_vocabulary(
        [args.captions], 300, os.path.join(tempfile.mkdtemp(), "vocab.json")
    )
    systems = {
        "ours": CaptionDatasetMapper(_config(tokenizer, args.crop, True), True),
        "ours, RESIZE_ANTIALIAS False": CaptionDatasetMapper(
            _config(tokenizer, args.crop, False), True
        ),
        "reference-style (cv2/numpy)": ReferenceStyle(tokenizer, args.crop),
        "reference-style + Normalize": ReferenceNormalized(tokenizer, args.crop),
    }
    try:
        import albumentations as alb

        systems[f"albumentations {alb.__version__}"] = Albumentations(tokenizer, args.crop, alb)
    except ImportError:
        print("albumentations is not installed: its column is left out")
    names = list(systems)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in records[:8]:  # warm-up: first calls allocate and import
        for n in names:
            systems[n](r)
    k = 0
    for _ in range(args.rounds):
        for r in records:
            k += 1
            for n in names[k % len(names) :] + names[: k % len(names)]:
                start = time.perf_counter()
                systems[n](r)
                times[n].append(time.perf_counter() - start)
    ref = statistics.median(times["reference-style (cv2/numpy)"])
    alb_name = next((n for n in names if n.startswith("albumentations")), None)
    alb = statistics.median(times[alb_name]) if alb_name else None
    print(
        f"{len(records)} images x {args.rounds} rounds, {args.crop} px crops, one thread; "
        "median ms/image (mean):"
    )
    for n in names:
        med, mean = statistics.median(times[n]), statistics.fmean(times[n])
        versus = f"   x{med / alb:.2f} of albumentations" if alb else ""
        print(
            f"  {n:32s} {1000 * med:6.2f} ({1000 * mean:5.2f})   x{med / ref:.2f} of "
            f"reference-style{versus}"
        )
    ours = times["ours"]
    print(
        f"ours: {1 / statistics.median(ours):.0f} images/s per worker from the median, "
        f"{len(ours) / sum(ours):.0f} from the mean"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
