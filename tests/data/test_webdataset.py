"""WebDataset shards (README "Web-scale data"): make_shards output, shard splitting across ranks
and workers, deterministic shuffling, exact resume of the stream, and bad-sample skip-and-count."""

from __future__ import annotations

import io
import json
import shutil
import sys
import tarfile

import pytest
import webdataset as wds
from helpers import COCO_TINY, REPO, needs_coco_tiny, virtex_cfg
from PIL import Image

from virtex_d2.data.caption_mapper import CaptionDatasetMapper
from virtex_d2.data.shards import expand_shards
from virtex_d2.data.streaming import StreamingTrainLoader
from virtex_d2.data.validation import BadDataError

sys.path.insert(0, str(REPO / "datasets"))
import make_shards  # noqa: E402

NUM_IMAGES, PER_SHARD = 24, 3  # the `shards` fixture (conftest.py): 8 shards of 3


def keys_only(record: dict) -> dict:
    """A mapper that decodes nothing: the sample's name and captions."""
    return {"file_name": record["file_name"], "captions": record["captions"]}


def loader(
    urls,
    *,
    rank=0,
    world=1,
    workers=2,
    seed=5,
    batch=3,
    mapper=keys_only,
    fraction=0.01,
    buffer=100,
):
    return StreamingTrainLoader(
        urls,
        mapper,
        batch_size=batch,
        num_workers=workers,
        seed=seed,
        max_bad_fraction=fraction,
        shuffle_buffer=buffer,
        rank=rank,
        world_size=world,
    )


def take(data_loader, n: int) -> list[list[str]]:
    it = iter(data_loader)
    return [[d["file_name"].rsplit("/", 1)[-1] for d in next(it)] for _ in range(n)]


# --------------------------------------------------------------------------------- make_shards
def test_make_shards_keeps_every_caption_one_sample_per_image(shards, synthetic):
    assert shards["shards"] == NUM_IMAGES // PER_SHARD and shards["samples"] == NUM_IMAGES
    assert shards["pattern"].endswith("{00000..00007}.tar") and not shards["skipped"]
    assert sorted(p.name for p in shards["dir"].iterdir()) == [f"{i:05d}.tar" for i in range(8)]
    gt = json.loads(
        (synthetic["root"] / "synthetic" / "annotations" / "captions_train.json").read_text()
    )
    by_image = {}
    for a in gt["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a["caption"].strip())
    seen = {}
    for url in shards["urls"]:
        for sample in wds.WebDataset(url, shardshuffle=False):
            meta = json.loads(sample["json"])
            assert meta["captions"] == by_image[meta["image_id"]] and len(meta["captions"]) == 5
            assert meta["caption"] == meta["captions"][0] == sample["txt"].decode()
            Image.open(io.BytesIO(sample["jpg"])).verify()
            seen[meta["image_id"]] = sample["__key__"]
    assert sorted(seen) == sorted(by_image)


@needs_coco_tiny
def test_make_shards_on_real_coco_captions_with_split_dirs(tmp_path):
    out = tmp_path / "coco"
    summary = make_shards.make_shards(
        str(COCO_TINY / "annotations" / "captions_subset.json"),
        str(COCO_TINY),
        str(out),
        5,
        progress=False,
    )
    assert summary["samples"] == 17 and summary["shards"] == 4 and summary["captions"] == 85
    records = [
        r
        for url in expand_shards([f"webdataset:{out}/*.tar"])
        for r in wds.WebDataset(url, shardshuffle=False)
    ]
    assert len({r["__key__"] for r in records}) == 17


def test_make_shards_skips_missing_images_and_writes_no_temporary_file(synthetic, tmp_path):
    base = synthetic["root"] / "synthetic"
    images = tmp_path / "images"
    shutil.copytree(base / "train", images)
    victim = sorted(images.iterdir())[3]
    victim.unlink()
    summary = make_shards.make_shards(
        str(base / "annotations" / "captions_train.json"),
        str(images),
        str(tmp_path / "out"),
        10,
        progress=False,
    )
    assert summary["samples"] == NUM_IMAGES - 1 and summary["shards"] == 3
    assert list(summary["skipped"]) == [str(victim)]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "00000.tar",
        "00001.tar",
        "00002.tar",
    ]


# ------------------------------------------------------------------------------------ splitting
def test_ranks_and_workers_read_disjoint_shards_that_cover_every_sample(shards):
    # 2 ranks x 2 workers: 4 slots of 2 shards = 6 samples per stream and epoch, i.e. the
    # first 4 batches of 3 of a rank are its first epoch.
    per_rank = [sum(take(loader(shards["urls"], rank=r, world=2), 4), []) for r in (0, 1)]
    assert len(set(per_rank[0])) == len(per_rank[0]) == NUM_IMAGES // 2
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == NUM_IMAGES


def test_shuffling_is_deterministic_per_seed_and_changes_between_epochs(shards):
    first = take(loader(shards["urls"], workers=0, batch=NUM_IMAGES), 2)
    assert take(loader(shards["urls"], workers=0, batch=NUM_IMAGES), 2) == first
    assert sorted(first[0]) == sorted(first[1]) and first[0] != first[1]  # epochs 0 and 1
    assert take(loader(shards["urls"], workers=0, seed=6, batch=NUM_IMAGES), 1)[0] != first[0]
    # One stream reads its shards one after the other (8 contiguous runs of 3), shuffling the
    # samples inside each shard: make_shards wrote them in key order, and not all stay so.
    shard_of = [name.split("#")[0] for name in first[0]]
    assert sum(a != b for a, b in zip(shard_of, shard_of[1:])) + 1 == 8
    runs = [first[0][i : i + PER_SHARD] for i in range(0, NUM_IMAGES, PER_SHARD)]
    assert any(run != sorted(run) for run in runs)
    assert sorted(shard_of) != shard_of  # and the shard order is shuffled too


def test_resumed_stream_continues_with_the_same_batches(shards):
    full = take(loader(shards["urls"]), 11)
    head = loader(shards["urls"])
    assert take(head, 5) == full[:5]
    state = head.state_dict()
    resumed = loader(shards["urls"])
    resumed.load_state_dict(state)
    resumed.start_iter = 5  # odd: worker 0 now serves stream 1
    assert take(resumed, 6) == full[5:]


def test_resume_with_another_worker_count_is_refused(shards):
    head = loader(shards["urls"])
    take(head, 2)
    other = loader(shards["urls"], workers=1)
    with pytest.raises(ValueError, match="same number of processes and DATALOADER.NUM_WORKERS"):
        other.load_state_dict(head.state_dict())


def test_patterns_that_match_nothing_and_too_few_shards_are_clear_errors(shards, tmp_path):
    with pytest.raises(BadDataError, match=r"matches no shard"):
        expand_shards([f"webdataset:{tmp_path}/*.tar"])
    with pytest.raises(BadDataError, match=r"00009.tar: No such file"):
        expand_shards([f"webdataset:{shards['dir']}/{{00000..00009}}.tar"])
    with pytest.raises(BadDataError, match=r"8 shard\(s\) cannot feed 4 process\(es\) x 3"):
        loader(shards["urls"], world=4, workers=3)


# ---------------------------------------------------------------------------------- bad samples
def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (seed * 40 % 256, 90, 160)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def good(i: int) -> dict:
    return {"__key__": f"good{i:03d}", "jpg": _jpeg(i), "txt": b"a red circle left of a square"}


@pytest.fixture
def bad_shards(tmp_path):
    write_shard(
        tmp_path / "a.tar",
        [
            good(0),
            good(1),
            {"__key__": "corrupt", "jpg": _jpeg(2)[:60], "txt": b"a blue square"},
            {"__key__": "empty_caption", "jpg": _jpeg(3), "json": json.dumps({"caption": " "})},
            {"__key__": "no_caption", "jpg": _jpeg(4), "json": json.dumps({"url": "x"})},
            {"__key__": "no_image", "txt": b"a green triangle"},
            good(5),
            good(6),
        ],
    )
    write_shard(tmp_path / "b.tar", [good(i) for i in range(10, 16)])
    return sorted(str(p) for p in tmp_path.glob("*.tar"))


@pytest.fixture
def mapper(synthetic):
    cfg = virtex_cfg(tokenizer_path=synthetic["tokenizer"], vocab_size=synthetic["vocab_size"])
    cfg.INPUT.VIRTEX.CROP_SIZE = 32
    return CaptionDatasetMapper(cfg, True)


def test_bad_samples_are_skipped_counted_and_named(bad_shards, mapper):
    data = loader(bad_shards, workers=0, batch=4, mapper=mapper, fraction=1.0)
    batches = take(data, 3)
    names = sum(batches, [])
    assert all(n.split("#")[1].startswith("good") for n in names)  # only good samples
    assert len(names) == 12 and len(set(names[:10])) == 10  # epoch 0 then epoch 1 starts
    bad = {name.split("#")[1]: why for name, why in data.tracker.bad.items()}
    assert sorted(bad) == ["corrupt", "empty_caption", "no_caption", "no_image"]
    assert "UnreadableImageError" in bad["corrupt"] and "caption" in bad["no_caption"]
    assert data.tracker.read >= 14


def test_too_many_bad_samples_stop_the_run_naming_them(bad_shards, mapper):
    data = loader(bad_shards, workers=0, batch=4, mapper=mapper, fraction=0.0)
    with pytest.raises(BadDataError, match=r"(?s)1 of the \d+ .*a.tar#(corrupt|empty_caption|no_)"):
        take(data, 3)


def test_a_shard_of_garbage_stops_the_run_instead_of_hanging(tmp_path, mapper):
    for name in ("x.tar", "y.tar"):
        (tmp_path / name).write_bytes(b"this is not a tar file" * 100)
    data = loader(sorted(str(p) for p in tmp_path.glob("*.tar")), workers=2, mapper=mapper)
    with pytest.raises(BadDataError, match=r"x.tar|y.tar"):
        take(data, 1)


def test_a_truncated_shard_keeps_its_readable_samples(bad_shards, mapper, tmp_path):
    b = bad_shards[1]
    data = open(b, "rb").read()
    with open(b, "wb") as f:
        f.write(data[: len(data) * 2 // 3])  # cut inside a member
    with tarfile.open(b) as t:
        with pytest.raises(tarfile.ReadError):
            t.getmembers()
    stream = loader([b, bad_shards[0]], workers=0, batch=2, mapper=mapper, fraction=1.0)
    names = sum(take(stream, 4), [])
    assert any("b.tar#good01" in n for n in names)  # samples before the cut are used
    assert any(k.endswith("b.tar") for k in stream.tracker.bad)
