"""`make demo` machinery: a smoke run end to end (and its reuse), stage resume logic, results."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "tools"))  # the demo is a tool (tools/demo), not in the package
from demo import plan as P  # noqa: E402
from demo.results import aggregate, final_evaluation, loss_curve  # noqa: E402
from demo.stages import MARKER, STARTED, Runner, StageError, finished, write_json  # noqa: E402

RESULT_KEYS = {"coco_bbox_AP", "coco_segm_AP", "lvis_AP"}


@pytest.fixture
def tiny_root(tmp_path, monkeypatch):
    """A tiny synthetic dataset (the demo subprocesses find it through the environment)."""
    from virtex_d2.data.datasets.builtin import register_all_virtex_datasets
    from virtex_d2.data.datasets.synthetic import generate_synthetic_dataset

    root = tmp_path / "d2"
    generate_synthetic_dataset(str(root / "synthetic"), num_train=24, num_val=8, image_size=64)
    monkeypatch.setenv("DETECTRON2_DATASETS", str(root))
    yield root
    monkeypatch.undo()
    register_all_virtex_datasets()


def _stage(tmp_path):
    return P.TrainStage(
        "finetune/coco/random/seed1",
        "configs/demo/mask_rcnn_R_18_FPN.yaml",
        ["SEED", "1"],
        str(tmp_path / "stage"),
    )


class _FakeRunner(Runner):
    """Records the command instead of training; writes what train_net would. A run given
    weights reports AP 5/4 (box/mask), one from random init 3/2, so results can be told apart."""

    def _execute(self, cmd, output_dir, tag):
        self.commands.append(cmd)
        weights = cmd[cmd.index("MODEL.WEIGHTS") + 1] if "MODEL.WEIGHTS" in cmd else ""
        box, mask = (5.0, 4.0) if weights else (3.0, 2.0)
        with open(os.path.join(output_dir, "metrics.json"), "a") as f:
            f.write(json.dumps({"iteration": 1, "total_loss": 2.0}) + "\n")
            f.write(
                json.dumps(
                    {
                        "iteration": 2,
                        "bbox/AP": box,
                        "segm/AP": mask,
                        "segm/APr": 1.0,
                        "segm/APc": 1.0,
                        "segm/APf": 1.0,
                    }
                )
                + "\n"
            )
        return 1.5


def test_smoke_demo_end_to_end_then_reused(tiny_root, tmp_path, capsys, monkeypatch):
    """One real stage (pretraining, then its conversion, captions and grounding check); the
    fine-tunes go through a fake runner, which is enough to test their plumbing."""
    from demo import pipeline

    real_init = pipeline.Demo.__init__
    fakes = []

    def with_fake_finetunes(self, args, repo):
        real_init(self, args, repo)
        self.parallel = _FakeRunner(repo, threads=1)
        self.parallel.commands = []
        fakes.append(self.parallel)

    monkeypatch.setattr(pipeline.Demo, "__init__", with_fake_finetunes)
    out = tmp_path / "demo"
    assert pipeline.main(["--smoke", "--output", str(out)], repo=str(REPO)) == 0
    first = capsys.readouterr().out
    assert "pretrain/bicaptioning] starting" in first and " iter: " in first
    assert len(fakes[0].commands) == 4  # COCO and LVIS, from VirTex and from random init
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"virtex", "random", "seeds"}
    for init in ("virtex", "random"):
        assert RESULT_KEYS <= set(results[init])
        assert all(isinstance(results[init][k], float) for k in RESULT_KEYS)
    assert (results["virtex"]["coco_bbox_AP"], results["random"]["coco_bbox_AP"]) == (5.0, 3.0)
    assert (results["virtex"]["lvis_AP"], results["random"]["lvis_AP"]) == (4.0, 2.0)
    assert [s["seed"] for s in results["seeds"]] == [1]
    assert results["seeds"][0]["virtex"]["coco_bbox_AP"] == results["virtex"]["coco_bbox_AP"]
    report = (out / "report.md").read_text()
    assert "| COCO box AP" in report and "VirTex init" in report
    for png in ("losses.png", "ap_by_init.png", "captions.png"):
        assert (out / png).stat().st_size > 1000 and f"({png})" in report
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions["captions"]) == 8
    # The grounding check ran on the pretrained captioner and its numbers are in the report.
    grounding = captions["grounding"]
    assert grounding["num_images"] == 8
    assert grounding["gap"] == pytest.approx(grounding["shuffled_loss"] - grounding["loss"])
    assert f"{grounding['shuffled_loss']:.3f} with the images shuffled" in report
    # The VirTex fine-tune got the converted backbone, the random one no weights.
    virtex = json.loads((out / "finetune/coco/virtex/seed1" / MARKER).read_text())
    random = json.loads((out / "finetune/coco/random/seed1" / MARKER).read_text())
    backbone = out / "pretrain/bicaptioning/backbone_d2.pth"
    assert backbone.stat().st_size > 1_000_000  # converted from the real pretraining
    assert virtex["signature"]["opts"][:2] == ["MODEL.WEIGHTS", str(backbone)]
    assert random["signature"]["opts"][:2] == ["MODEL.WEIGHTS", ""]
    # Identical otherwise (config, seed, schedule), up to the output directory.
    assert virtex["signature"]["config"] == random["signature"]["config"]
    assert virtex["signature"]["opts"][2:-1] == random["signature"]["opts"][2:-1]
    # A second run reuses every stage and reproduces the same results.
    assert pipeline.main(["--smoke", "--output", str(out)], repo=str(REPO)) == 0
    second = capsys.readouterr().out
    assert "starting" not in second and second.count("already finished") == 5
    assert fakes[1].commands == []
    assert json.loads((out / "results.json").read_text()) == results


def test_finished_stage_is_reused_and_half_finished_one_resumed(tmp_path):
    stage = _stage(tmp_path)
    runner = _FakeRunner(str(REPO), threads=1)
    runner.commands = []
    assert finished(stage, "", str(REPO)) is None
    # Interrupted: a checkpoint but no marker -> --resume.
    os.makedirs(stage.output_dir)
    (tmp_path / "stage" / "last_checkpoint").write_text("model_0000049.pth")
    record = runner.run(stage, "")
    assert "--resume" in runner.commands[0]
    assert record["results"] == {  # from random init (no weights), see _FakeRunner
        "bbox": {"AP": 3.0},
        "segm": {"AP": 2.0, "APr": 1.0, "APc": 1.0, "APf": 1.0},
    }
    assert record["resumed"] and record["cpu_seconds"] == 1.5
    # Finished: reused without running anything.
    assert runner.run(stage, "") == record and len(runner.commands) == 1
    # A fresh directory starts without --resume.
    fresh = _stage(tmp_path / "other")
    runner.run(fresh, "")
    assert "--resume" not in runner.commands[1]


def test_edited_config_or_new_weights_are_not_taken_for_a_finished_stage(tmp_path):
    base = REPO / "configs" / "demo" / "mask_rcnn_R_18_FPN.yaml"
    config = tmp_path / "leaf.yaml"
    config.write_text(f'_BASE_: "{base}"\nSOLVER:\n  BASE_LR: 0.02\n')
    weights = tmp_path / "backbone.pth"
    weights.write_bytes(b"first backbone")
    stage = P.TrainStage(
        "finetune/coco/virtex/seed1", str(config), ["SEED", "1"], str(tmp_path / "stage")
    )
    runner = _FakeRunner(str(REPO), threads=1)
    runner.commands = []
    runner.run(stage, str(weights))
    assert finished(stage, str(weights), str(REPO)) is not None
    # An edit inside a config file (not on the command line) makes it another run.
    config.write_text(f'_BASE_: "{base}"\nSOLVER:\n  BASE_LR: 0.01\n')
    with pytest.raises(StageError, match="resolved config or initial weights differ"):
        finished(stage, str(weights), str(REPO))
    config.write_text(f'_BASE_: "{base}"\nSOLVER:\n  BASE_LR: 0.02\n')
    assert finished(stage, str(weights), str(REPO)) is not None
    # So does a re-pretrained backbone at the same path.
    weights.write_bytes(b"second backbone")
    with pytest.raises(StageError, match="resolved config or initial weights differ"):
        finished(stage, str(weights), str(REPO))


def test_directory_of_another_configuration_is_refused(tmp_path):
    stage = _stage(tmp_path)
    write_json(
        os.path.join(stage.output_dir, STARTED),
        {"signature": {"config": stage.config, "opts": ["SEED", "7"]}},
    )
    with pytest.raises(StageError, match="another configuration"):
        finished(stage, "", str(REPO))


def test_results_json_shape_means_and_seeds():
    def coco(box, mask):
        return {"bbox": {"AP": box}, "segm": {"AP": mask}}

    def lvis(ap):
        return {"bbox": {"AP": ap + 1}, "segm": {"AP": ap, "APr": 0.0, "APc": ap, "APf": ap}}

    per_seed = {
        1: {
            "virtex": {"coco": coco(10.0, 8.0), "lvis": lvis(3.0)},
            "random": {"coco": coco(2.0, 1.0), "lvis": lvis(1.0)},
        },
        2: {
            "virtex": {"coco": coco(12.0, 10.0), "lvis": lvis(5.0)},
            "random": {"coco": coco(4.0, float("nan")), "lvis": lvis(1.0)},
        },
    }
    out = aggregate(per_seed)
    assert list(out) == ["virtex", "random", "seeds"]
    assert out["virtex"]["coco_bbox_AP"] == 11.0 and out["virtex"]["coco_segm_AP"] == 9.0
    assert out["virtex"]["lvis_AP"] == 4.0 and out["virtex"]["lvis_bbox_AP"] == 5.0
    assert out["random"]["coco_segm_AP"] == 1.0  # NaN seeds are left out of the mean
    assert [s["seed"] for s in out["seeds"]] == [1, 2]
    assert out["seeds"][1]["virtex"]["coco_bbox_AP"] == 12.0
    json.dumps(out)


def test_metrics_parsing_skips_torn_lines_and_keeps_last_value(tmp_path):
    path = tmp_path / "metrics.json"
    lines = [
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 39, "total_loss": 2.0},
        {"iteration": 39, "total_loss": 1.5},  # re-logged after a resume
        {"iteration": 40, "captioning/CIDEr": 0.5, "captioning/BLEU-4": 0.1},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + '\n{"iteration": 4')
    assert loss_curve(str(path)) == [(19, 3.0), (39, 1.5)]
    assert final_evaluation(str(path)) == {"captioning": {"CIDEr": 0.5, "BLEU-4": 0.1}}
    assert final_evaluation(str(tmp_path / "missing.json")) == {}
    assert math.isclose(final_evaluation(str(path))["captioning"]["CIDEr"], 0.5)


def test_ablation_table_means_each_task_over_seeds(tmp_path):
    from demo.pipeline import _ablation
    from demo.report import ablation_table

    sched = P.Schedule(seeds=(1, 2))
    fts = P.finetune_stages(sched, str(tmp_path), ablation=True)
    by_name = {
        s.name: {
            "results": {
                "bbox": {"AP": float(len(s.name) % 7 + int(s.name[-1]))},
                "segm": {"AP": 1.0},
            }
        }
        for s in fts
    }
    pre = {
        t: {"results": {"captioning": {"CIDEr": 0.25}} if t in P.CAPTIONING_TASKS else {}}
        for t in P.PRETRAIN_TASKS
    }
    table = _ablation(fts, by_name, pre)
    assert list(table) == list(P.PRETRAIN_TASKS)
    runs = [by_name[f"finetune/coco/masked_lm/seed{s}"]["results"]["bbox"]["AP"] for s in (1, 2)]
    assert table["masked_lm"]["coco_bbox_AP"] == sum(runs) / 2
    assert table["bicaptioning"]["caption_CIDEr"] == 0.25
    assert table["masked_lm"]["caption_CIDEr"] is None
    assert len(table["token_classification"]["seeds"]) == 2
    assert "| masked_lm" in ablation_table(table)
