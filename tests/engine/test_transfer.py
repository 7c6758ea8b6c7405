"""Transfer end to end: VirTex checkpoint -> conversion -> Mask R-CNN fine-tuning -> COCO/LVIS
AP."""

from __future__ import annotations

import json
import math

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json
from detectron2.modeling import build_model
from helpers import COCO_TINY, REPO, load_config, load_tool

from virtex_d2.checkpoint.convert import convert_checkpoint, save_d2_checkpoint
from virtex_d2.engine.trainer import Trainer

FAST = [
    "SOLVER.IMS_PER_BATCH",
    "2",
    "SOLVER.MAX_ITER",
    "2",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.STEPS",
    "()",
    "DATALOADER.NUM_WORKERS",
    "0",
    "TEST.PRECISE_BN.ENABLED",
    "False",
    "SOLVER.CHECKPOINT_PERIOD",
    "100",
    "INPUT.MIN_SIZE_TRAIN",
    "(96,)",
    "INPUT.MIN_SIZE_TEST",
    "96",
    # An almost untrained detector returns hundreds of low-score boxes; pasting their masks
    # would dominate the test's time without testing anything more.
    "TEST.DETECTIONS_PER_IMAGE",
    "20",
]


@pytest.fixture(scope="module")
def virtex_weights(synthetic, tmp_path_factory):
    """A VirTex bicaptioning R-18 checkpoint (as the trainer writes it), converted for D2."""
    out = tmp_path_factory.mktemp("virtex")
    cfg = load_config(
        "synthetic/bicaptioning_R_18.yaml",
        "MODEL.VIRTEX.TOKENIZER",
        synthetic["tokenizer"],
        "MODEL.VIRTEX.VOCAB_SIZE",
        str(synthetic["vocab_size"]),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # distinguishable from any fresh init
        for p in model.backbone.parameters():
            p.add_(0.01)
    DetectionCheckpointer(model, save_dir=str(out)).save("model_final")
    result = convert_checkpoint(str(out / "model_final.pth"), "virtex_d2")
    assert any(k.startswith("textual_head.") for k in result.unused_keys)
    save_d2_checkpoint(result, str(out / "virtex_d2.pth"))
    return {"path": str(out / "virtex_d2.pth"), "backbone": model.backbone.state_dict()}


def _finetune(config, weights, out_dir, *opts):
    cfg = load_config(config, "MODEL.WEIGHTS", weights, "OUTPUT_DIR", str(out_dir), *FAST, *opts)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return cfg, trainer


@pytest.mark.parametrize(
    "config,evaluated",
    [
        ("synthetic/mask_rcnn_R_18_FPN.yaml", ("bbox", "segm")),
        ("synthetic/lvis_mask_rcnn_R_18_FPN.yaml", ("bbox", "segm")),
    ],
)
def test_converted_virtex_backbone_finetunes_and_evaluates(
    virtex_weights, tmp_path, config, evaluated
):
    cfg, trainer = _finetune(config, virtex_weights["path"], tmp_path)
    loaded = trainer.model.backbone.bottom_up.state_dict()
    for key, value in virtex_weights["backbone"].items():
        if "num_batches_tracked" not in key:
            assert torch.equal(loaded[key], value), key
    trainer.train()
    # DATASETS.TEST is evaluated once at the end of training (TEST.EVAL_PERIOD 0).
    results = trainer._last_eval_results
    for task in evaluated:
        assert math.isfinite(results[task]["AP"])
    if "lvis" in config:
        assert {"APr", "APc", "APf"} <= set(results["bbox"])
        assert (
            tmp_path / "inference" / "synthetic_lvis_val" / "lvis_instances_results.json"
        ).exists()
    # The LVIS benchmark runs the same evaluation from a checkpoint.
    if "lvis" in config:
        benchmark_lvis = load_tool("benchmark_lvis")

        trainer.checkpointer.save("model_final")
        out = benchmark_lvis.main(
            [
                "--config-file",
                str(REPO / "configs" / config),
                "--weights",
                str(tmp_path / "model_final.pth"),
                "--dataset",
                "synthetic_lvis_val",
                "--json",
                str(tmp_path / "bench.json"),
                "--output-dir",
                str(tmp_path / "bench"),
                "INPUT.MIN_SIZE_TEST",
                "96",
                "TEST.DETECTIONS_PER_IMAGE",
                "20",
            ]
        )
        saved = json.loads((tmp_path / "bench.json").read_text())
        assert saved["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], abs=1e-6)
        assert out is not None


@pytest.fixture(scope="module")
def coco_tiny():
    ann = COCO_TINY / "annotations"
    if not ann.exists():
        pytest.skip("shared coco_tiny data not present")
    names = {}
    for split, limit in (("train2017", None), ("val2017", 6)):
        name = f"coco_tiny_{split}_transfer_test"
        json_file, root = str(ann / f"instances_{split}.json"), str(COCO_TINY / split)

        def loader(json_file=json_file, root=root, name=name, limit=limit):
            return load_coco_json(json_file, root, name)[:limit]

        if name not in DatasetCatalog.list():
            DatasetCatalog.register(name, loader)
            # No json_file: the evaluator must build the ground truth of this 6-image subset.
            MetadataCatalog.get(name).set(evaluator_type="coco", image_root=root)
        DatasetCatalog.get(name)  # sets thing classes and id mapping
        names[split] = name
    return names


def test_real_coco_photographs_with_polygons_finetune_and_evaluate(
    coco_tiny, virtex_weights, tmp_path
):
    cfg, trainer = _finetune(
        "synthetic/mask_rcnn_R_18_FPN.yaml",
        virtex_weights["path"],
        tmp_path,
        "DATASETS.TRAIN",
        f"('{coco_tiny['train2017']}',)",
        "DATASETS.TEST",
        f"('{coco_tiny['val2017']}',)",
        "MODEL.ROI_HEADS.NUM_CLASSES",
        "80",
        "INPUT.MIN_SIZE_TRAIN",
        "(160,)",
        "INPUT.MIN_SIZE_TEST",
        "160",
    )
    assert cfg.INPUT.MASK_FORMAT == "polygon"
    trainer.train()
    storage_losses = trainer.storage.latest()
    assert "loss_mask" in storage_losses and math.isfinite(storage_losses["loss_mask"][0])
    results = trainer._last_eval_results
    assert math.isfinite(results["bbox"]["AP"]) and math.isfinite(results["segm"]["AP"])
