from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests share 2 cores with data-loader workers; more intra-op threads only add contention.
torch.set_num_threads(2)


@pytest.fixture
def tokenizer(tmp_path):
    from helpers import make_tokenizer

    return make_tokenizer(tmp_path)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic dataset (24 train / 8 val, 64 px) registered as the synthetic_*
    datasets (so nothing is generated under ./datasets), and a vocabulary of its captions."""
    from virtex_d2.data.datasets.builtin import register_all_virtex_datasets
    from virtex_d2.data.datasets.synthetic import generate_synthetic_dataset
    from virtex_d2.data.tokenizer import train_vocabulary

    root = tmp_path_factory.mktemp("d2datasets")
    generate_synthetic_dataset(str(root / "synthetic"), num_train=24, num_val=8, image_size=64)
    old = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = str(root)
    register_all_virtex_datasets(str(root))
    tok = train_vocabulary(
        [root / "synthetic" / "annotations" / "captions_train.json"], 120, root / "vocab.json"
    )
    yield {"root": root, "tokenizer": tok.path, "vocab_size": len(tok)}
    if old is None:
        os.environ.pop("DETECTRON2_DATASETS")
    else:
        os.environ["DETECTRON2_DATASETS"] = old
    register_all_virtex_datasets()


@pytest.fixture(scope="module")
def shards(synthetic, tmp_path_factory):
    """The `synthetic` fixture's 24 train images as 8 WebDataset shards of 3
    (datasets/make_shards.py): {"dir", "pattern", "shards", "samples", "captions", "skipped",
    "urls"}."""
    from helpers import REPO

    from virtex_d2.data.shards import expand_shards

    sys.path.insert(0, str(REPO / "datasets"))
    import make_shards

    out = tmp_path_factory.mktemp("shards")
    base = synthetic["root"] / "synthetic"
    summary = make_shards.make_shards(
        str(base / "annotations" / "captions_train.json"),
        str(base / "train"),
        str(out),
        3,
        progress=False,
    )
    return {"dir": out, **summary, "urls": expand_shards(["webdataset:" + summary["pattern"]])}
