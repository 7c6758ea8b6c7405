#!/usr/bin/env python
"""Training data loader alone: WebDataset shards against the json + image folder, same images.

Both paths go through the Trainer's own loader builders with the same ``CaptionDatasetMapper``
(random-resized crops of ``--crop`` px, flips, colour jitter, tokenization) and the same number of
workers; the shards are written first from the same captions json with datasets/make_shards.py.
Each measurement runs in a fresh process, in alternating order, so that load from other
processes affects both; the median images/s of each is printed side by side with the ratio
shards / json, and so is the CPU time the workers spent per image, which other processes on a
shared machine do not inflate.

    python tools/benchmarks/benchmark_loader.py [--captions JSON --images DIR] [--workers 2]
        [--batch-size 16] [--batches 30] [--repeats 3]

Default data: the real COCO photos of ../shared/data/coco_tiny (the first 16 of its 17
captioned images, read over and over). Timing starts after ``--warmup`` batches, so worker
start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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


def _worker_cpu_s() -> float:
    """CPU seconds (user + system) of this process's live children: the data-loader workers."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        if int(fields[1]) == os.getpid():
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _measure(cfg, args) -> dict:
    """images/s of the timed batches, and worker CPU ms per image (contention-independent)."""
    from virtex_d2.engine.trainer import Trainer

    loader = iter(Trainer.build_train_loader(cfg))
    for _ in range(args.warmup):
        next(loader)
    cpu, start, n = _worker_cpu_s(), time.perf_counter(), 0
    for _ in range(args.batches):
        n += len(next(loader))
    elapsed, cpu = time.perf_counter() - start, _worker_cpu_s() - cpu
    loader.close()  # stops the workers
    return {"images_per_s": n / elapsed, "cpu_ms_per_image": 1000 * cpu / n}


def _equal_subset(captions: str, num_shards: int, tmp: str) -> tuple[str, int]:
    """A copy of ``captions`` keeping the first images, a multiple of ``num_shards`` of them
    (with captions); returns (its path, images per shard)."""
    with open(captions) as f:
        data = json.load(f)
    captioned = sorted(
        {a["image_id"] for a in data["annotations"] if str(a.get("caption", "")).strip()}
    )
    per_shard = len(captioned) // num_shards
    if per_shard == 0:
        raise SystemExit(f"{captions} has {len(captioned)} captioned images; need {num_shards}")
    keep = set(captioned[: per_shard * num_shards])
    data["images"] = [i for i in data["images"] if i["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = os.path.join(tmp, "captions.json")
    with open(path, "w") as f:
        json.dump(data, f)
    return path, per_shard


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--captions", default=os.path.join(COCO_TINY, "annotations", "captions_subset.json")
    )
    parser.add_argument("--images", default=COCO_TINY)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=224)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each path")
    # Set by the parent for its child runs.
    parser.add_argument("--measure", choices=("json + folder", "shards"), help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    parser.add_argument("--vocab-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--shards", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    sys.path.insert(0, os.path.join(REPO, "datasets"))
    import make_shards
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from virtex_d2.data.datasets.coco_captions import load_coco_captions_json
    from virtex_d2.data.tokenizer import train_vocabulary

    if args.measure:
        tokenizer, summary = None, {"pattern": args.shards}
    else:
        tmp = tempfile.mkdtemp(prefix="benchmark_loader_")
        # Two equal shards per worker, and the json path on exactly those images: then every
        # stream's epoch has as many images as the others, and both paths see every image
        # equally often (unequal shards would weight some images more, and decoding cost
        # differs between images).
        args.captions, per_shard = _equal_subset(args.captions, 2 * max(1, args.workers), tmp)
        tokenizer = train_vocabulary([args.captions], 300, os.path.join(tmp, "vocab.json"))
        summary = make_shards.make_shards(
            args.captions, args.images, os.path.join(tmp, "shards"), per_shard, progress=False
        )
    records = load_coco_captions_json(args.captions, args.images)
    name = "benchmark_loader_json"
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: load_coco_captions_json(args.captions, args.images))
    paths = {"json + folder": name, "shards": "webdataset:" + summary["pattern"]}
    if args.measure:  # a child run: one measurement, printed as json
        cfg = _config(args, args.vocab, args.vocab_size, paths[args.measure])
        print(json.dumps(_measure(cfg, args)))
        return 0
    print(
        f"{len(records)} images, {summary['shards']} shards of <= {per_shard}; "
        f"{args.workers} workers, batches of {args.batch_size}, {args.crop} px crops"
    )
    runs: dict[str, list[dict]] = {k: [] for k in paths}
    for repeat in range(args.repeats):
        # A fresh process per measurement; the order alternates, so that neither path always
        # runs right after the other.
        for label in list(paths)[:: 1 if repeat % 2 == 0 else -1]:
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                *(argv or sys.argv[1:]),
                "--captions",
                args.captions,
                "--measure",
                label,
                "--vocab",
                tokenizer.path,
                "--vocab-size",
                str(len(tokenizer)),
                "--shards",
                summary["pattern"],
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
            if out.returncode:
                raise SystemExit(f"measurement of {label} failed:\n{out.stderr[-3000:]}")
            runs[label].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[label][-1]
            print(
                f"  run {repeat + 1} {label:>13}: {r['images_per_s']:7.1f} images/s, "
                f"{r['cpu_ms_per_image']:5.2f} worker CPU ms/image",
                flush=True,
            )
    med = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in runs.items()}
    a, b = med["json + folder"], med["shards"]
    print(
        f"median images/s: json + folder {a['images_per_s']:.1f} | shards "
        f"{b['images_per_s']:.1f} | ratio shards/json "
        f"{b['images_per_s'] / a['images_per_s']:.3f}"
    )
    print(
        f"median worker CPU ms/image: json + folder {a['cpu_ms_per_image']:.2f} | shards "
        f"{b['cpu_ms_per_image']:.2f} | ratio json/shards "
        f"{a['cpu_ms_per_image'] / b['cpu_ms_per_image']:.3f}"
    )
    shutil.rmtree(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
