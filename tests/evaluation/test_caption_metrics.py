"""Caption metrics, CaptioningEvaluator and tools/eval_captions.py against the official toolkit."""

from __future__ import annotations

import json
import math
import uuid
from collections import OrderedDict
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog
from helpers import SHARED, load_tool

from virtex_d2.evaluation import caption_metrics as cm
from virtex_d2.evaluation.caption_metrics import (
    CaptionScores,
    JavaNotFoundError,
    optional_metric_problems,
    score_captions,
)
from virtex_d2.evaluation.captioning import RESULTS_FILE_NAME, CaptioningEvaluator

CAPTIONS_JSON = SHARED / "data" / "coco_tiny" / "annotations" / "captions_subset.json"
# Metrics that need only the tokenizer's JVM: keeps tests that do not exercise METEOR fast.
FAST = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"]

needs_java = pytest.mark.skipif(cm.find_java() is None, reason="java not on PATH")


@pytest.fixture(scope="module")
def coco_split(tmp_path_factory):
    """Real COCO captions: refs 1-4 of each image as ground truth, ref 5 as the prediction."""
    if not CAPTIONS_JSON.is_file():
        pytest.skip(f"{CAPTIONS_JSON} not found")
    data = json.loads(CAPTIONS_JSON.read_text())
    per_image = OrderedDict((img["id"], []) for img in data["images"])
    for ann in data["annotations"]:
        per_image[ann["image_id"]].append(ann)
    gt = dict(data, annotations=[a for anns in per_image.values() for a in anns[:4]])
    results = [{"image_id": i, "caption": anns[4]["caption"]} for i, anns in per_image.items()]
    root = tmp_path_factory.mktemp("coco_split")
    (root / "gt.json").write_text(json.dumps(gt))
    (root / "results.json").write_text(json.dumps(results))
    gts = OrderedDict((i, [a["caption"] for a in anns[:4]]) for i, anns in per_image.items())
    res = {r["image_id"]: r["caption"] for r in results}
    return root, gts, res


def _official_scores(gt_path: Path, results_path: Path, monkeypatch) -> dict:
    """Run pycocoevalcap's COCOEvalCap as its README does, with SPICE stubbed out (offline)."""
    import pycocoevalcap.eval as official
    from pycocotools.coco import COCO

    class NoSpice:  # SPICE's constructor would download CoreNLP
        def compute_score(self, gts, res):
            return 0.0, [0.0] * len(gts)

        def method(self):
            return "SPICE"

    monkeypatch.setattr(official, "Spice", NoSpice)
    coco = COCO(str(gt_path))
    coco_eval = official.COCOEvalCap(coco, coco.loadRes(str(results_path)))
    coco_eval.evaluate()
    names = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4"}
    names.update({"METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"})
    return {ours: 100.0 * float(coco_eval.eval[theirs]) for theirs, ours in names.items()}


@needs_java
def test_identical_to_official_pipeline(coco_split, monkeypatch):
    root, gts, res = coco_split
    official = _official_scores(root / "gt.json", root / "results.json", monkeypatch)
    ours = score_captions(gts, res)
    assert ours.num_images == 17
    assert set(ours.scores) | set(ours.skipped) == set(cm.METRIC_NAMES)
    assert not set(ours.scores) & set(ours.skipped)
    for name, value in official.items():
        assert ours.scores[name] == value, name  # exact, not approximate
    # Real human captions score like human agreement does on COCO, not like noise.
    assert 50 < ours.scores["BLEU-1"] < 90 and 50 < ours.scores["CIDEr"] < 200
    assert all(math.isfinite(v) for v in ours.scores.values())


@needs_java
def test_hand_checked_values(capfd):
    gts = {
        1: ["the cat sat on the mat", "a cat is on the mat today"],
        2: ["a dog runs in the park", "the dog is running"],
        3: ["two birds on a wire", "birds sitting on a power line"],
    }
    # Image 1 only: hypothesis tokens (after lower-casing, '.' dropped) a cat on a mat;
    # clipped unigram matches a(1, as the 2nd ref has one 'a') cat on mat = 4 of 5;
    # closest reference length is 6, so the brevity penalty is exp(1 - 6/5).
    one = score_captions({1: gts[1]}, {1: "A cat on a mat."}, metrics=["BLEU-1"])
    assert one.scores["BLEU-1"] == pytest.approx(100 * 0.8 * math.exp(1 - 6 / 5), abs=1e-6)

    same = score_captions(gts, {1: gts[1][0], 2: gts[2][1], 3: gts[3][0]}, metrics=FAST)
    for n in range(1, 5):
        assert same.scores[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-5)
    assert same.scores["ROUGE-L"] == pytest.approx(100.0, abs=1e-9)

    disjoint = score_captions(gts, {1: "xylophone", 2: "zebra quilt", 3: "vivid jam"}, FAST)
    assert disjoint.scores["BLEU-1"] < 1e-6 and disjoint.scores["BLEU-4"] < 1e-6
    assert disjoint.scores["ROUGE-L"] == 0.0 and disjoint.scores["CIDEr"] == 0.0
    assert same.scores["CIDEr"] > 100.0
    assert capfd.readouterr().out == ""  # the toolkit's progress prints are kept off stdout

    # Decoding can stop at once; an empty caption must score, not crash or shift captions.
    empty = score_captions({1: gts[1], 2: gts[2]}, {1: "", 2: gts[2][0]}, metrics=FAST)
    assert 0.0 < empty.scores["CIDEr"] < same.scores["CIDEr"]


@needs_java
def test_string_and_mixed_image_ids(coco_split):
    _, gts, res = coco_split
    reference = score_captions(gts, res, metrics=FAST)
    # Ids with spaces, slashes, tabs and mixed types: only the Python side ever sees them.
    new_ids = [f"img {i}\t/x" if k % 3 else i for k, i in enumerate(gts)]
    new_ids[1] = ("tuple", 1)
    rename = dict(zip(gts, new_ids))
    renamed = score_captions(
        {rename[i]: caps for i, caps in gts.items()},
        {rename[i]: cap for i, cap in res.items()},
        metrics=FAST,
    )
    assert renamed.scores == reference.scores


def test_mismatched_ids_are_errors(coco_split):
    _, gts, res = coco_split
    first = next(iter(gts))
    with pytest.raises(ValueError, match="missing from the ground truth: 'nope'"):
        score_captions(gts, dict(res, nope="a caption"), metrics=FAST)
    with pytest.raises(ValueError, match=f"without a result: {first}"):
        score_captions(gts, {i: c for i, c in res.items() if i != first}, metrics=FAST)
    with pytest.raises(ValueError, match="Unknown or no metrics"):
        score_captions(gts, res, metrics=["BLEU-5"])
    with pytest.raises(ValueError, match="non-empty list of str"):
        score_captions({1: []}, {1: "a cat"}, metrics=FAST)


@needs_java
def test_subset_scores_only_images_with_results(coco_split):
    _, gts, res = coco_split
    keep = list(gts)[:5]
    subset = score_captions(gts, {i: res[i] for i in keep}, metrics=FAST, allow_subset=True)
    direct = score_captions({i: gts[i] for i in keep}, {i: res[i] for i in keep}, metrics=FAST)
    assert subset.num_images == 5 and subset.scores == direct.scores


def test_missing_java(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no java anywhere
    assert optional_metric_problems() == {
        "METEOR": "java not found on PATH",
        "SPICE": "java not found on PATH",
    }
    with pytest.raises(JavaNotFoundError, match="PTB tokenizer"):
        score_captions({1: ["a cat"]}, {1: "a cat"})


@needs_java
def test_optional_metrics_skipped_with_reason(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(cm, "_METEOR_JAR", tmp_path / "absent-meteor.jar")

    def no_download():
        raise AssertionError("SPICE must not start a CoreNLP download")

    monkeypatch.setattr(cm._spice_mod, "get_stanford_models", no_download)
    monkeypatch.setattr(cm, "_SPICE_CORENLP_JARS", (tmp_path / "absent-corenlp.jar",))
    with caplog.at_level("WARNING", logger=cm.__name__):
        result = score_captions({1: ["a cat on a mat"]}, {1: "a cat"}, metrics=["METEOR", "SPICE"])
    assert result.scores == {}
    assert "absent-meteor.jar" in result.skipped["METEOR"]
    assert "absent-corenlp.jar" in result.skipped["SPICE"]
    assert sum("Skipping" in r.getMessage() for r in caplog.records) == 2


@needs_java
def test_optional_metric_failure_is_reported_not_raised(monkeypatch):
    class BrokenMeteor:
        def compute_score(self, gts, res):
            raise ValueError("could not convert string to float: ''")

    monkeypatch.setattr(cm._meteor_mod, "Meteor", BrokenMeteor)
    result = score_captions({1: ["a cat"]}, {1: "a cat"}, metrics=["METEOR", "BLEU-1"])
    assert "failed while running" in result.skipped["METEOR"]
    assert set(result.scores) == {"BLEU-1"}


@needs_java
def test_truncated_tokenizer_output_is_an_error(monkeypatch):
    original = cm._ptb_mod.PTBTokenizer.tokenize

    def lose_last(self, captions):
        out = original(self, captions)
        out.popitem()
        return out

    monkeypatch.setattr(cm._ptb_mod.PTBTokenizer, "tokenize", lose_last)
    with pytest.raises(RuntimeError, match="incomplete output"):
        score_captions({1: ["a cat"], 2: ["a dog"]}, {1: "a cat", 2: "a dog"}, metrics=FAST)


@pytest.fixture
def caption_dataset(coco_split):
    _, gts, _ = coco_split
    name = f"test_captions_{uuid.uuid4().hex[:8]}"
    records = [{"image_id": i, "file_name": f"{i}.jpg", "captions": c} for i, c in gts.items()]
    DatasetCatalog.register(name, lambda: records)
    yield name
    DatasetCatalog.remove(name)


@needs_java
@pytest.mark.parametrize("distributed", [False, True])
def test_evaluator_end_to_end(coco_split, caption_dataset, tmp_path, distributed):
    _, gts, res = coco_split
    evaluator = CaptioningEvaluator(
        caption_dataset, output_dir=str(tmp_path), distributed=distributed, metrics=FAST
    )
    evaluator.reset()
    ids = list(gts)[:10]  # a quick evaluation on part of the split
    for batch in (ids[:4], ids[4:]):
        evaluator.process(
            [{"image_id": i, "height": 1, "width": 1} for i in batch],
            [{"caption": res[i]} for i in batch],
        )
    results = evaluator.evaluate()
    assert list(results) == ["captioning"]
    expected = score_captions(gts, {i: res[i] for i in ids}, metrics=FAST, allow_subset=True)
    assert results["captioning"] == expected.scores
    assert all(isinstance(v, float) for v in results["captioning"].values())
    written = json.loads((tmp_path / RESULTS_FILE_NAME).read_text())
    assert written == [{"image_id": i, "caption": res[i]} for i in ids]


def test_evaluator_rejects_dataset_without_captions(tmp_path):
    name = f"test_no_captions_{uuid.uuid4().hex[:8]}"
    DatasetCatalog.register(name, lambda: [{"image_id": 1, "file_name": "x.jpg"}])
    try:
        evaluator = CaptioningEvaluator(name, distributed=False)
        evaluator.process([{"image_id": 1}], [{"caption": "a cat"}])
        with pytest.raises(KeyError, match="no 'captions'"):
            evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)


def _load_cli():
    return load_tool("eval_captions")


@needs_java
def test_cli_with_string_ids(coco_split, tmp_path, capsys):
    root, gts, res = coco_split
    gt = json.loads((root / "gt.json").read_text())
    # Rewrite every id as a string with a space, in the ground truth and the results alike.
    for img in gt["images"]:
        img["id"] = f"coco {img['id']}"
    for ann in gt["annotations"]:
        ann["image_id"] = f"coco {ann['image_id']}"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    results = [{"image_id": f"coco {i}", "caption": c} for i, c in res.items()]
    (tmp_path / "res.json").write_text(json.dumps(results))
    out = tmp_path / "scores.json"
    argv = ["--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "res.json")]
    assert _load_cli().main(argv + ["--json", str(out), "--metrics"] + FAST) == 0
    written = json.loads(out.read_text())
    expected = score_captions(gts, res, metrics=FAST)
    assert written == CaptionScores(expected.scores, {}, 17).to_json()
    printed = capsys.readouterr().out
    assert f"CIDEr{expected.scores['CIDEr']:>15.2f}" in printed and "17 images" in printed

    (tmp_path / "res.json").write_text(json.dumps(results[1:]))
    assert _load_cli().main(argv + ["--metrics", "BLEU-1"]) == 1
    assert "without a result: 'coco " in capsys.readouterr().err
    assert _load_cli().main(argv + ["--metrics", "BLEU-1", "--subset"]) == 0
    assert "16 images" in capsys.readouterr().out
    (tmp_path / "res.json").write_text(json.dumps(results + results[:1]))
    assert _load_cli().main(argv) == 1
    assert "more than one result" in capsys.readouterr().err
