#!/usr/bin/env python
"""Training data loader alone: WebDataset shards against the json + image folder, same images.

Both paths go through the Trainer's own loader builders with the same ``CaptionDatasetMapper``
(random-resized crops of ``--crop`` px, flips, colour jitter, tokenization) and the same number of
workers; the shards are written first from the same captions json with datasets/make_shards.py.
Runs alternate (json, shards, json, shards, ...) so that load from other processes affects both;
the median images/s of each is printed side by side with the ratio shards / json.

    python tools/benchmarks/benchmark_loader.py [--captions JSON --images DIR] [--workers 2]
        [--batch-size 16] [--batches 30] [--repeats 3]

Default data: the real COCO photos of ../shared/data/coco_tiny (17 captioned images, read
over and over). Timing starts after ``--warmup`` batches, so worker start-up is not counted.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COCO_TINY = os.path.join(os.path.dirname(REPO), "shared", "data", "coco_tiny")


def _config(args, tokenizer, vocab_size: int, train: str):
    from detectron2.config import get_cfg

    import virtex_d2

    cfg = get_cfg()
    virtex_d2.add_virtex_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "synthetic", "bicaptioning_R_18.yaml"))
    cfg.MODEL.VIRTEX.TOKENIZER, cfg.MODEL.VIRTEX.VOCAB_SIZE = tokenizer, vocab_size
    cfg.INPUT.VIRTEX.CROP_SIZE = args.crop
    cfg.INPUT.VIRTEX.CROP_SCALE = (0.2, 1.0)  # the paper's, as for real photos
    cfg.DATALOADER.NUM_WORKERS = args.workers
    cfg.SOLVER.IMS_PER_BATCH = args.batch_size
    cfg.DATASETS.TRAIN = (train,)
    cfg.SEED = 0
    return cfg


def _images_per_s(cfg, args) -> float:
    from virtex_d2.engine.trainer import Trainer

    loader = iter(Trainer.build_train_loader(cfg))
    for _ in range(args.warmup):
        next(loader)
    start, n = time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(next(loader))
    elapsed = time.perf_counter() - start
    loader.close()  # stops the workers before the next run starts its own
    return n / elapsed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", default=os.path.join(COCO_TINY, "annotations",
                                                           "captions_subset.json"))
    parser.add_argument("--images", default=COCO_TINY)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path")
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(REPO, "datasets"))
    import make_shards
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from virtex_d2.data.datasets.coco_captions import load_coco_captions_json
    from virtex_d2.data.tokenizer import train_vocabulary

    tmp = tempfile.mkdtemp(prefix="benchmark_loader_")
    tokenizer = train_vocabulary([args.captions], 300, os.path.join(tmp, "vocab.json"))
    records = load_coco_captions_json(args.captions, args.images)
    # Enough shards for every worker, as a real run would have.
    per_shard = max(1, len(records) // (2 * max(1, args.workers)))
    summary = make_shards.make_shards(args.captions, args.images, os.path.join(tmp, "shards"),
                                      per_shard, progress=False)
    name = "benchmark_loader_json"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_captions_json(args.captions, args.images))
    paths = {"json + folder": name, "shards": "webdataset:" + summary["pattern"]}
    print(f"{len(records)} images, {summary['shards']} shards of <= {per_shard}; "
          f"{args.workers} workers, batches of {args.batch_size}, {args.crop} px crops")
    rates: dict[str, list[float]] = {k: [] for k in paths}
    for repeat in range(args.repeats):
        for label, train in paths.items():
            cfg = _config(args, tokenizer.path, len(tokenizer), train)
            rates[label].append(_images_per_s(cfg, args))
            print(f"  run {repeat + 1} {label:>13}: {rates[label][-1]:7.1f} images/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"median images/s: json + folder {med['json + folder']:.1f} | shards "
          f"{med['shards']:.1f} | ratio shards/json {med['shards'] / med['json + folder']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
