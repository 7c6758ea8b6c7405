"""Tokenizer, augmentations and the caption dataset mapper."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from helpers import COCO_TINY, virtex_cfg, write_captions_json
from PIL import Image

from virtex_d2.data.caption_mapper import CaptionDatasetMapper, mask_tokens
from virtex_d2.data.tokenizer import EOS_ID, MASK_ID, SOS_ID, CaptionTokenizer, train_vocabulary
from virtex_d2.data.transforms import (
    swap_left_right,
    was_flipped,
)


@pytest.mark.parametrize(
    "before,after",
    [
        ("a cat left of a dog", "a cat right of a dog"),
        ("Left and RIGHT, right?", "Right and LEFT, left?"),
        ("a bright light on the left-hand side", "a bright light on the right-hand side"),
        ("the rights of leftovers", "the rights of leftovers"),
        ("bright lefty copyright", "bright lefty copyright"),
    ],
)
def test_flip_swaps_whole_words_only(before, after):
    assert swap_left_right(before) == after
    assert swap_left_right(after) == before


def test_tokenizer_round_trip_and_pickle(tokenizer):
    text = "a red circle left of a blue square"
    ids = tokenizer.encode(text)
    assert ids and min(ids) >= 4  # no special ids inside a caption
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([SOS_ID, *ids, EOS_ID, 0, 0]) == text
    assert tokenizer.encode("A RED Circle") == tokenizer.encode("a red circle")
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(text) == ids and len(clone) == len(tokenizer)
    for i, special in enumerate(["[UNK]", "[SOS]", "[EOS]", "[MASK]"]):
        assert tokenizer.token_to_id(special) == i


def test_vocabulary_from_real_coco_captions(tmp_path):
    src = COCO_TINY / "annotations" / "captions_subset.json"
    if not src.exists():
        pytest.skip("shared coco_tiny data not present")
    tok = train_vocabulary([src], 200, tmp_path / "v.json")
    assert len(tok) == 200
    caption = json.loads(src.read_text())["annotations"][0]["caption"]
    normalised = " ".join(caption.lower().split())
    assert tok.decode(tok.encode(caption)) == normalised


def test_missing_tokenizer_file_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_vocabulary.py"):
        CaptionTokenizer(tmp_path / "nope.json")


def test_mlm_bert_rule_statistics():
    rng = np.random.RandomState(0)
    tokens = [SOS_ID] + list(range(10, 30)) + [EOS_ID]
    picked = masked = replaced = 0
    for _ in range(2000):
        corrupted, labels = mask_tokens(tokens, 100, 0.15, 0.8, 0.1, rng, rule="bert")
        assert labels[0] == labels[-1] == 0 and corrupted[0] == SOS_ID
        sel = [i for i, lab in enumerate(labels) if lab]
        assert sel, "at least one token is always selected"
        picked += len(sel)
        masked += sum(corrupted[i] == MASK_ID for i in sel)
        replaced += sum(corrupted[i] not in (MASK_ID, tokens[i]) for i in sel)
    assert 0.13 < picked / (2000 * 20) < 0.17
    assert 0.75 < masked / picked < 0.85
    assert 0.06 < replaced / picked < 0.12  # a random token may equal the original


def test_mlm_reference_rule_counts_and_targets():
    """The reference's rule: exactly ceil(0.15 n) positions; 85% [MASK], 10% random, 5% kept;
    only [MASK]ed positions are predicted; a single chosen position is always [MASK]."""
    rng = np.random.RandomState(0)
    tokens = [SOS_ID] + list(range(10, 30)) + [EOS_ID]  # n = 20 -> 3 positions
    masked = replaced = kept = 0
    for _ in range(3000):
        corrupted, labels = mask_tokens(tokens, 100, 0.15, 0.85, 0.10, rng)
        changed = [i for i in range(len(tokens)) if corrupted[i] != tokens[i]]
        is_mask = [i for i in changed if corrupted[i] == MASK_ID]
        assert [i for i, lab in enumerate(labels) if lab] == is_mask  # targets = [MASK] only
        assert all(labels[i] == tokens[i] for i in is_mask)
        assert len(changed) <= 3 and corrupted[0] == SOS_ID and corrupted[-1] == EOS_ID
        masked += len(is_mask)
        replaced += len(changed) - len(is_mask)
    kept = 3 * 3000 - masked - replaced  # kept, or replaced by the same token (1 in 96)
    assert 0.83 < masked / 9000 < 0.87
    assert 0.08 < replaced / 9000 < 0.12
    assert 0.03 < kept / 9000 < 0.07
    for n in range(1, 7):  # ceil(0.15 n) = 1: the chosen token always becomes [MASK]
        short = [SOS_ID] + list(range(10, 10 + n)) + [EOS_ID]
        for _ in range(50):
            corrupted, labels = mask_tokens(short, 100, 0.15, 0.85, 0.10, rng)
            assert corrupted.count(MASK_ID) == 1 and sum(bool(lab) for lab in labels) == 1


def _record(tmp_path, caption, size=(80, 60)):
    path = tmp_path / "img.jpg"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (size[1], size[0], 3), np.uint8)).save(
        path
    )
    return {
        "file_name": str(path),
        "image_id": 7,
        "height": size[1],
        "width": size[0],
        "captions": [caption],
        "labels": [1, 4],
    }


@pytest.mark.parametrize(
    "task,key",
    [
        ("bicaptioning", "noitpac_tokens"),
        ("masked_lm", "mlm_labels"),
        ("token_classification", "token_bag"),
        ("multilabel_classification", "labels"),
    ],
)
def test_mapper_outputs_task_targets(tmp_path, tokenizer, task, key):
    cfg = virtex_cfg(task, tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    cfg.INPUT.VIRTEX.CROP_SIZE = 32
    mapper = CaptionDatasetMapper(cfg, is_train=True)
    out = mapper(_record(tmp_path, "a red circle left of a blue square"))
    assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.uint8
    toks = out["caption_tokens"].tolist()
    assert toks[0] == SOS_ID and toks[-1] == EOS_ID
    assert key in out
    if task == "bicaptioning":
        assert out["noitpac_tokens"].tolist() == [SOS_ID, *toks[-2:0:-1], EOS_ID]


def test_mapper_flip_changes_caption_words(tmp_path, tokenizer):
    cfg = virtex_cfg("captioning", tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    cfg.INPUT.VIRTEX.CROP_SIZE = 32
    cfg.INPUT.VIRTEX.HFLIP_PROBABILITY = 1.0
    mapper = CaptionDatasetMapper(cfg, is_train=True)
    out = mapper(_record(tmp_path, "a bright circle left of a square"))
    assert out["caption"] == "a bright circle right of a square"
    assert tokenizer.decode(out["caption_tokens"].tolist()) == out["caption"]


def test_mapper_clips_long_captions(tmp_path, tokenizer):
    cfg = virtex_cfg("captioning", tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
    cfg.MODEL.VIRTEX.MAX_CAPTION_LENGTH = 8
    cfg.INPUT.VIRTEX.TEST_RESIZE, cfg.INPUT.VIRTEX.TEST_CROP_SIZE = 40, 32
    mapper = CaptionDatasetMapper(cfg, is_train=False)
    out = mapper(_record(tmp_path, " ".join(["red circle"] * 30)))
    toks = out["caption_tokens"].tolist()
    assert len(toks) == 8 and toks[-1] == EOS_ID
    assert out["image"].shape == (3, 32, 32)


def test_flip_detection_counts_flips():
    flip = T.HFlipTransform(10)
    assert was_flipped(T.TransformList([flip]))
    assert not was_flipped(T.TransformList([flip, flip]))
    assert not was_flipped(T.TransformList([T.NoOpTransform()]))


def test_build_vocabulary_cli(tmp_path):
    import sys

    from helpers import REPO

    sys.path.insert(0, str(REPO / "tools"))
    import build_vocabulary

    caps = write_captions_json(
        tmp_path / "c.json",
        ["a red circle left of a square"] * 3 + ["two blue stars above a green triangle"] * 3,
    )
    assert (
        build_vocabulary.main(
            ["--captions", str(caps), "--vocab-size", "60", "--output", str(tmp_path / "v.json")]
        )
        == 0
    )
    tok = CaptionTokenizer(tmp_path / "v.json")
    assert tok.decode(tok.encode("two blue stars")) == "two blue stars"
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    assert (
        build_vocabulary.main(["--captions", str(bad), "--output", str(tmp_path / "x.json")]) == 1
    )
