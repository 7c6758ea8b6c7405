"""Grounding check: does a captioner's loss depend on which image it sees?"""

from __future__ import annotations

import json

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from helpers import load_tool, make_tokenizer, tiny_textual_head_opts, virtex_cfg

from virtex_d2.data.tokenizer import EOS_ID, SOS_ID
from virtex_d2.evaluation.grounding import measure_grounding, rotation

COLOURED_CAPTIONS = {
    (220, 30, 30): "a red circle",
    (30, 30, 220): "a blue square",
    (30, 200, 30): "a green triangle",
    (230, 220, 40): "a yellow star",
}


@pytest.mark.parametrize("n", [2, 3, 7])
def test_rotation_moves_every_image(n):
    perm = rotation(n)
    assert sorted(perm.tolist()) == list(range(n))
    assert all(int(p) != i for i, p in enumerate(perm))


def test_rotation_needs_two_images():
    with pytest.raises(ValueError, match="at least 2"):
        rotation(1)


@pytest.fixture(scope="module")
def colour_task(tmp_path_factory):
    """Four plain-coloured 32 px images whose captions differ only by the colour and shape."""
    tok = make_tokenizer(tmp_path_factory.mktemp("tok"))
    cfg = virtex_cfg("captioning", tokenizer_path=str(tok.path), vocab_size=len(tok))
    g = torch.Generator().manual_seed(0)
    batch = []
    for rgb, caption in COLOURED_CAPTIONS.items():
        image = torch.tensor(rgb, dtype=torch.float).view(3, 1, 1).expand(3, 32, 32)
        image = (image + torch.randn(3, 32, 32, generator=g) * 5).clamp(0, 255).to(torch.uint8)
        tokens = torch.tensor([SOS_ID, *tok.encode(caption), EOS_ID])
        batch.append({"image": image, "caption_tokens": tokens, "caption": caption})
    return cfg, batch


def test_a_captioner_that_learned_the_colours_is_grounded(colour_task):
    cfg, batch = colour_task
    torch.manual_seed(0)
    model = build_model(cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    with EventStorage():
        for _ in range(60):
            loss = model(batch)["loss_caption_forward"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    report = measure_grounding(model, [batch])
    assert report.num_images == 4
    # Each caption is predictable only from its image: the wrong image must cost a lot.
    assert report.gap > 0.5, report
    assert report.distinct_captions == 4
    assert report.to_json()["gap"] == pytest.approx(report.shuffled_loss - report.loss)


def test_a_captioner_blind_to_the_image_has_no_gap(colour_task):
    cfg, batch = colour_task
    model = build_model(cfg)
    with torch.no_grad():
        model.textual_head.visual_projection.weight.zero_()
        model.textual_head.visual_projection.bias.zero_()
    report = measure_grounding(model, [batch[:2], batch[2:]])
    assert report.num_images == 4
    assert report.gap == pytest.approx(0.0, abs=1e-6)
    assert report.distinct_captions == 1


def test_grounding_refuses_a_classification_model():
    model = build_model(virtex_cfg("token_classification"))
    with pytest.raises(ValueError, match="bicaptioning/captioning"):
        measure_grounding(model, [])


def test_check_grounding_tool_on_the_synthetic_val_split(synthetic, tmp_path):
    tool = load_tool("check_grounding")

    cfg = virtex_cfg("bicaptioning")
    cfg.merge_from_list(
        tiny_textual_head_opts(synthetic)
        + [
            "DATASETS.TEST",
            "('synthetic_captions_val',)",
            "INPUT.VIRTEX.TEST_RESIZE",
            "64",
            "INPUT.VIRTEX.TEST_CROP_SIZE",
            "64",
        ]
    )
    (tmp_path / "cfg.yaml").write_text(cfg.dump())
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    args = ["--config-file", str(tmp_path / "cfg.yaml"), "--weights", str(tmp_path / "model.pth")]

    out = str(tmp_path / "g.json")
    assert tool.main(args + ["--num-images", "7", "--batch-size", "3", "--json", out]) == 0
    result = json.loads((tmp_path / "g.json").read_text())
    # 7 images in batches of 3: the trailing single image joins the previous batch.
    assert result["dataset"] == "synthetic_captions_val" and result["num_images"] == 7
    assert result["gap"] == pytest.approx(result["shuffled_loss"] - result["loss"])
    assert tool.main(args + ["--batch-size", "1"]) == 1
    assert tool.main(args + ["--dataset", "no_such_dataset"]) == 1
