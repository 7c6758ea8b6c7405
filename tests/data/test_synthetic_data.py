"""The synthetic shapes generator: determinism, valid COCO / LVIS / captions files, and
captions that are true of the generated geometry."""

from __future__ import annotations

import functools
import json
import multiprocessing
import os
import re
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_util
import pytest
from iopath.common.file_io import file_lock
from PIL import Image
from pycocotools.coco import COCO

from virtex_d2.data.datasets import synthetic
from virtex_d2.data.datasets.synthetic import (
    COLOURS,
    MARKER_NAME,
    SHAPE_NAMES,
    SHAPE_PLURALS,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
    is_synthetic_dataset_complete,
)

# pycocotools 2.0.11 warns inside mask.decode on numpy >= 2 on every call; not ours to fix.
pytestmark = pytest.mark.filterwarnings(
    "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"
)
SMALL = dict(num_train=12, num_val=6, image_size=96)
SPLITS = ("train", "val")

# Caption grammar pieces, written out here rather than imported, so the checks below are
# independent of the generator's own phrase builders.
_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(sorted(list(SHAPE_PLURALS.values()) + SHAPE_NAMES, key=len, reverse=True))
_SIZE = "small|medium-sized|large"
_NP = rf"(?:a|an) (?:(?:{_SIZE}) )?(?:{_COLOUR}) (?:{_SHAPE})\b"
_NP_PARTS = re.compile(rf"(?:a|an) (?:({_SIZE}) )?({_COLOUR}) ({_SHAPE})$")
_RELATION = re.compile(rf"({_NP}) (?:is )?(to the left of|to the right of|above|below) ({_NP})")
_POSITION = re.compile(
    rf"({_NP}) (in the (top|bottom) (left|right) corner|on the (left|right) side|"
    r"at the (top|bottom)|in the middle)"
)
_SIZE_OF = {"small": "small", "medium-sized": "medium", "large": "large"}
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5}


def _singular(word: str) -> str:
    return {v: k for k, v in SHAPE_PLURALS.items()}.get(word, word)


def _matching(np_text: str, objects: list) -> list:
    """Objects that a noun phrase such as "a large red circle" can refer to."""
    size, colour, shape = _NP_PARTS.match(np_text.lower()).groups()
    return [
        o
        for o in objects
        if o["colour"] == colour
        and o["shape"] == _singular(shape)
        and (size is None or o["size"] == _SIZE_OF[size])
    ]


def _relation_holds(rel: str, a: dict, b: dict) -> bool:
    (ax, ay), (bx, by) = a["center"], b["center"]
    return {
        "to the left of": ax < bx,
        "to the right of": ax > bx,
        "above": ay < by,
        "below": ay > by,
    }[rel]


def _relations_true(caption: str, objects: list) -> list:
    """For each relation phrase in the caption: whether some pair of objects makes it true."""
    results = []
    for a_np, rel, b_np in _RELATION.findall(caption.lower()):
        pairs = [(a, b) for a in _matching(a_np, objects) for b in _matching(b_np, objects)]
        results.append(any(_relation_holds(rel, a, b) for a, b in pairs if a is not b))
    return results


def _mirror(objects: list, size: int) -> list:
    return [{**o, "center": [size - o["center"][0], o["center"][1]]} for o in objects]


def _swap_left_right(caption: str) -> str:
    return re.sub(r"\b(left|right)\b", lambda m: "right" if m[1] == "left" else "left", caption)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_small")
    summary = generate_synthetic_dataset(str(root), return_scenes=True, **SMALL)
    captions = {
        s: json.loads((root / "annotations" / f"captions_{s}.json").read_text()) for s in SPLITS
    }
    return root, summary, captions


def _scenes_with_captions(small):
    _, summary, captions = small
    for split in SPLITS:
        by_image = {}
        for ann in captions[split]["annotations"]:
            by_image.setdefault(ann["image_id"], []).append(ann["caption"])
        for scene in summary["scenes"][split]:
            yield scene, by_image[scene["image_id"]]


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_and_summary(small):
    root, summary, _ = small
    for split, n in (("train", SMALL["num_train"]), ("val", SMALL["num_val"])):
        assert len(list((root / split).glob("*.jpg"))) == n
        for kind in ("captions", "instances", "lvis"):
            assert (root / "annotations" / f"{kind}_{split}.json").is_file()
        info = summary["splits"][split]
        assert info["num_images"] == n and info["num_captions"] == 5 * n
        assert info["num_rle"] >= 1 and info["num_crowd"] >= 1
    assert is_synthetic_dataset_complete(str(root))
    with Image.open(next((root / "train").glob("*.jpg"))) as im:
        assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 96)


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    root, _, _ = small
    generate_synthetic_dataset(str(tmp_path / "again"), **SMALL)
    generate_synthetic_dataset(str(tmp_path / "seed1"), seed=1, **SMALL)
    reference, again, other = _files(root), _files(tmp_path / "again"), _files(tmp_path / "seed1")
    assert again.keys() == reference.keys()
    assert [k for k in reference if again[k] != reference[k]] == []
    differing = [k for k in reference if other[k] != reference[k]]
    assert "annotations/captions_train.json" in differing
    assert sum(k.endswith(".jpg") for k in differing) == SMALL["num_train"] + SMALL["num_val"]


def _check_masks(api_anns, to_mask, size):
    for ann in api_anns:
        mask = to_mask(ann)
        assert mask.shape == (size, size) and mask.any(), ann["id"]
        ys, xs = np.nonzero(mask)
        tight = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert ann["bbox"] == [float(v) for v in tight], ann["id"]
        assert ann["area"] == int(mask.sum()), ann["id"]
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= size and y + h <= size
        if isinstance(ann["segmentation"], list):
            coords = np.concatenate([np.asarray(p) for p in ann["segmentation"]])
            assert coords.min() >= 0 and coords.max() <= size, ann["id"]


@pytest.mark.parametrize("split", SPLITS)
def test_coco_instances(small, split):
    root, _, _ = small
    coco = COCO(str(root / "annotations" / f"instances_{split}.json"))
    ids = sorted(coco.getCatIds())
    assert len(ids) == len(SHAPE_NAMES) and ids != list(range(1, len(ids) + 1))
    assert all(c["supercategory"] for c in coco.loadCats(ids))
    anns = list(coco.anns.values())
    _check_masks(anns, coco.annToMask, 96)
    polygons = [a for a in anns if isinstance(a["segmentation"], list)]
    crowd = [a for a in anns if a["iscrowd"]]
    assert polygons and crowd
    # As in real COCO: every non-crowd object is a polygon (Detectron2's polygon mask format
    # cannot read RLE for them), crowd regions are RLE.
    assert all(not a["iscrowd"] for a in polygons)
    assert all(isinstance(a["segmentation"], dict) for a in crowd)
    # Crowds use COCO's uncompressed RLE, which pycocotools must convert first.
    assert all(isinstance(a["segmentation"]["counts"], list) for a in crowd)


@pytest.mark.parametrize("split", SPLITS)
def test_lvis_file(small, split):
    from lvis import LVIS

    root, _, _ = small
    lvis = LVIS(str(root / "annotations" / f"lvis_{split}.json"))
    cats = lvis.load_cats(None)
    assert sorted(c["id"] for c in cats) == list(range(1, len(cats) + 1))
    assert 40 <= len(cats) <= 60
    for c in cats:
        fields = {"name", "synset", "synonyms", "frequency", "image_count", "instance_count"}
        assert fields <= c.keys()
    anns = list(lvis.anns.values())
    assert all("iscrowd" not in a and isinstance(a["segmentation"], list) for a in anns)
    assert all(len(p) >= 6 and len(p) % 2 == 0 for a in anns for p in a["segmentation"])
    _check_masks(anns, lvis.ann_to_mask, 96)
    present = {}
    for a in anns:
        present.setdefault(a["image_id"], set()).add(a["category_id"])
    for img in lvis.dataset["images"]:
        assert img["coco_url"].split("/")[-2:] == [split, f"{img['id']:012d}.jpg"]
        assert (root / split / f"{img['id']:012d}.jpg").is_file()
        assert not set(img["neg_category_ids"]) & present.get(img["id"], set())
        assert not set(img["not_exhaustive_category_ids"]) & set(img["neg_category_ids"])
        assert img["neg_category_ids"]
    # Counts and frequencies are those of the train split, in both files.
    train = json.loads((root / "annotations" / "lvis_train.json").read_text())
    images, instances = {}, {}
    for a in train["annotations"]:
        images.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    for c in cats:
        n = len(images.get(c["id"], ()))
        assert c["image_count"] == n and c["instance_count"] == instances.get(c["id"], 0)
        assert c["frequency"] == ("r" if n <= 10 else "c" if n <= 100 else "f")
    # Crowds become "not exhaustively annotated" categories.
    assert any(img["not_exhaustive_category_ids"] for img in lvis.dataset["images"])


def test_image_pixels_match_annotations(small):
    """The named colour is what the image shows inside each shape's visible mask."""
    root, summary, _ = small
    palette = np.array(list(COLOURS.values()), dtype=float)
    checked = 0
    for split in SPLITS:
        coco = COCO(str(root / "annotations" / f"lvis_{split}.json"))
        scenes = {s["image_id"]: s for s in summary["scenes"][split]}
        for image_id, scene in scenes.items():
            image = np.asarray(Image.open(root / split / scene["file_name"]), dtype=float)
            anns = coco.imgToAnns[image_id]
            assert len(anns) == len(scene["objects"])
            for ann, obj in zip(sorted(anns, key=lambda a: a["id"]), scene["objects"]):
                pixels = image[coco.annToMask(ann).astype(bool)]
                nearest = np.argmin(((palette - np.median(pixels, 0)) ** 2).sum(1))
                assert list(COLOURS)[nearest] == obj["colour"], (scene["file_name"], obj)
                checked += 1
    assert checked > 20


def test_five_captions_about_what_is_there(small):
    _, _, captions = small
    for split in SPLITS:
        counts = {}
        for ann in captions[split]["annotations"]:
            assert isinstance(ann["caption"], str) and ann["caption"].strip()
            counts[ann["image_id"]] = counts.get(ann["image_id"], 0) + 1
        assert sorted(counts) == sorted(img["id"] for img in captions[split]["images"])
        assert set(counts.values()) == {5}
    for scene, texts in _scenes_with_captions(small):
        assert len(set(texts)) == 5
        things = scene["objects"] + ([scene["crowd"]] if scene["crowd"] else [])
        colours = {o["colour"] for o in things}
        shapes = {o["shape"] for o in things}
        for text in texts:
            words = re.findall(r"[a-z-]+", text.lower())
            assert {w for w in words if w in COLOURS} <= colours, (text, scene)
            assert {_singular(w) for w in words if _singular(w) in SHAPE_NAMES} <= shapes
            # "left" / "right" only in spatial phrases, so a flip may swap them blindly.
            for m in re.finditer(r"\b(left|right)\b", text.lower()):
                before, after = text.lower()[: m.start()], text.lower()[m.end() :]
                assert before.endswith(("to the ", "top ", "bottom ", "on the ")), text
                assert after.startswith((" of", " corner", " side")), text


def test_relations_are_geometrically_true_and_flip_with_the_words(small):
    true, mirrored_unswapped = [], []
    for scene, texts in _scenes_with_captions(small):
        mirrored = _mirror(scene["objects"], 96)
        for text in texts:
            true += _relations_true(text, scene["objects"])
            true += _relations_true(_swap_left_right(text), mirrored)
            if re.search(r"to the (left|right) of", text):
                mirrored_unswapped += _relations_true(text, mirrored)
    assert len(true) >= 20 and all(true)
    # Without swapping the words, most horizontal relations become false on the mirror
    # image, so the check above does test something.
    assert mirrored_unswapped and sum(mirrored_unswapped) < 0.5 * len(mirrored_unswapped)


def test_counts_positions_and_sizes_are_true(small):
    checked = 0
    for scene, texts in _scenes_with_captions(small):
        objects, size = scene["objects"], 96
        for text in (t.lower() for t in texts):
            groups = re.findall(rf"\b(two|three|four|five) ({_COLOUR}) ({_SHAPE})", text)
            for number, colour, plural in groups:
                key = (colour, _singular(plural))
                same = [o for o in objects if (o["colour"], o["shape"]) == key]
                assert len(same) == _NUMBERS[number], (text, scene)
                checked += 1
            for number in re.findall(r"\b(one|two|three|four|five) shapes?\b", text):
                assert len(objects) == _NUMBERS[number], text
                checked += 1
            if text.startswith("a single "):
                assert len(objects) == 1
            for match in _POSITION.finditer(text):
                np_text, where = match.group(1), match.group(2)
                ok = []
                for o in _matching(np_text, objects):
                    x, y = o["center"][0] / size, o["center"][1] / size
                    ok.append(
                        ("left" not in where or x < 0.5)
                        and ("right" not in where or x > 0.5)
                        and ("top" not in where or y < 0.5)
                        and ("bottom" not in where or y > 0.5)
                        and (where != "in the middle" or max(abs(x - 0.5), abs(y - 0.5)) < 0.2)
                    )
                assert any(ok), (text, scene)
                checked += 1
            for extreme, np_text in re.findall(rf"the (largest|smallest) shape is ({_NP})", text):
                areas = [o["full_area"] for o in objects]
                target = max(areas) if extreme == "largest" else min(areas)
                assert any(o["full_area"] == target for o in _matching(np_text, objects)), text
                checked += 1
    assert checked >= 20


def test_outline_polygons_decode_exactly():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = np.zeros((20, 20), bool)
        for _ in range(3):  # a few overlapping rectangles, some touching only diagonally
            x, y = rng.integers(0, 16, size=2)
            mask[y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
        polygons, has_holes = synthetic._outline_polygons(mask)
        if has_holes:
            continue
        decoded = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, 20, 20)))
        assert (decoded.astype(bool) == mask).all()
    ring = np.ones((6, 6), bool)
    ring[2:4, 2:4] = False
    assert synthetic._outline_polygons(ring)[1]


def test_bad_arguments_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        generate_synthetic_dataset(str(tmp_path), num_train=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_dataset(str(tmp_path), image_size=32)


def _counting_generate(counter: str, original, root):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\n")
    return original(root, num_train=6, num_val=3, image_size=64)


def _ensure_in_child(root, queue):
    try:
        queue.put(ensure_synthetic_dataset(root, wait_timeout_s=60))
    except Exception as e:  # reported to the parent, which fails the test
        queue.put(repr(e))


def test_concurrent_ensure_generates_once(tmp_path, monkeypatch):
    counter = str(tmp_path / "generations.txt")
    patched = functools.partial(_counting_generate, counter, generate_synthetic_dataset)
    monkeypatch.setattr(synthetic, "generate_synthetic_dataset", patched)
    root = str(tmp_path / "synthetic")
    ctx = multiprocessing.get_context("fork")  # children inherit the patched generator
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=(root, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert results == [root] * 3
    assert len(Path(counter).read_text().split()) == 1
    assert is_synthetic_dataset_complete(root) and not os.path.exists(root + ".lock")


def test_ensure_waits_for_a_live_lock_then_times_out(tmp_path):
    root = tmp_path / "synthetic"
    lock = tmp_path / "synthetic.lock"
    held = file_lock(str(root))  # alive: this process holds it (locks are per file handle)
    held.acquire()
    try:
        with pytest.raises(TimeoutError, match=re.escape(str(lock))):
            ensure_synthetic_dataset(str(root), wait_timeout_s=0.6)
    finally:
        held.release()
    assert not (root / MARKER_NAME).exists()
