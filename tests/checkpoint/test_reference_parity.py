"""An imported reference checkpoint computes what the reference implementation computed.

The parity fixture (shared/reference-parity) holds outputs of kdexd/virtex for a model rebuilt
here from names, shapes and a seeded recipe: beam-search tokens and captions of 8 photos and
teacher-forced losses. Other import cases (pre-norm heads, deeper heads, classification tasks,
broken inputs) are checked against a reference-layout oracle built from PyTorch's own decoder
layers, the modules the reference uses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from helpers import REPO
from PIL import Image
from reference_fixture import PARITY, rebuild_parity_checkpoint, reference_style_state_dict

from virtex_d2 import add_virtex_config
from virtex_d2.checkpoint.reference import ReferenceImportError, translate_config
from virtex_d2.engine.reference_import import import_reference
from virtex_d2.modeling.meta_arch import pad_tokens

pytestmark = pytest.mark.skipif(not PARITY.is_dir(), reason=f"{PARITY} not found")


def _load(result, **overrides):
    cfg = get_cfg()
    add_virtex_config(cfg)
    cfg.merge_from_file(result.config)
    for key, value in overrides.items():
        cfg.merge_from_list([key, value])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(result.weights)
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parity")
    ckpt = rebuild_parity_checkpoint(tmp / "reference.pth")
    return import_reference(
        str(ckpt),
        str(PARITY / "reference_config.yaml"),
        str(PARITY / "vocab_200.model"),
        str(tmp / "imported"),
    )


@pytest.fixture(scope="module")
def expected():
    return json.loads((PARITY / "expected.json").read_text())


def _pixels(expected) -> list[dict]:
    """The fixture's recipe: centre crop 224 of the 256 px PNGs (normalised by the model)."""
    out = []
    for name in expected["images"]:
        rgb = np.asarray(Image.open(PARITY / "images_256" / name).convert("RGB"))[16:240, 16:240]
        out.append({"image": torch.from_numpy(rgb.copy()).permute(2, 0, 1).float()})
    return out


def test_imported_files_load_weights_only(imported):
    state = torch.load(imported.weights, map_location="cpu", weights_only=True)
    assert state["model"]["textual_head.output.bias"].shape == (200,)
    cfg = yaml.safe_load(open(imported.config))
    assert cfg["MODEL"]["VIRTEX"]["DECODER"]["NAME"] == "reference_beam"
    assert cfg["MODEL"]["VIRTEX"]["TOKENIZER"] == imported.vocabulary
    assert cfg["MODEL"]["RESNETS"]["DEPTH"] == 18 and cfg["MODEL"]["WEIGHTS"] == imported.weights


def test_teacher_forced_losses_match_reference(imported, expected):
    model = _load(imported)
    tf = expected["teacher_forced"]
    seqs = [torch.tensor(t) for t in tf["caption_tokens"]]
    back = [torch.cat([s[:1], s[1:-1].flip(0), s[-1:]]) for s in seqs]
    with torch.no_grad():
        visual = model.textual_head.project_visual(model.visual_features(_pixels(expected)))
        forward = model.caption_loss(visual, pad_tokens(seqs, "cpu"), 0).item()
        backward = model.caption_loss(visual, pad_tokens(back, "cpu"), 1).item()
    assert forward == pytest.approx(tf["loss_forward"], rel=1e-4)
    assert backward == pytest.approx(tf["loss_backward"], rel=1e-4)
    assert forward + backward == pytest.approx(tf["loss_total"], rel=1e-4)


@pytest.mark.parametrize("use_cache", ["True", "False"])
def test_reference_beam_search_reproduces_tokens_and_captions(imported, expected, use_cache):
    model = _load(imported, **{"MODEL.VIRTEX.DECODER.USE_CACHE": use_cache})
    with torch.no_grad():
        tokens = model.generate(model.visual_features(_pixels(expected)))
    beam = expected["beam_search"]
    for name, got in zip(expected["images"], tokens):
        want = beam["tokens"][name]
        assert got == (want[: want.index(2)] if 2 in want else want), name
        assert model.tokenizer.decode(got) == beam["captions"][name], name


def test_our_beam_search_differs_from_the_reference_one(imported, expected):
    """The reference decoder is a real change of algorithm (else the test above proves less)."""
    model = _load(imported, **{"MODEL.VIRTEX.DECODER.NAME": "beam"})
    with torch.no_grad():
        tokens = model.generate(model.visual_features(_pixels(expected)))
    beam = expected["beam_search"]["tokens"]
    assert sum(t != beam[n] for n, t in zip(expected["images"], tokens)) >= 4


def test_caption_images_tool_writes_the_reference_captions(imported, expected, tmp_path):
    out = tmp_path / "captions.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "caption_images.py"),
            "--config-file",
            imported.config,
            "--weights",
            imported.weights,
            "--input",
            str(PARITY / "images_256"),
            "--output",
            str(out),
            "--num-workers",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = {
        os.path.basename(c["file_name"]): c["caption"]
        for c in json.loads(out.read_text())["captions"]
    }
    assert got == expected["beam_search"]["captions"]


def test_reference_nucleus_is_seeded_and_bans_repeats(imported, expected):
    model = _load(imported, **{"MODEL.VIRTEX.DECODER.NAME": "reference_nucleus"})
    with torch.no_grad():
        features = model.visual_features(_pixels(expected)[:4])
        first, again = model.generate(features), model.generate(features)
        uncached = model.generate(features, use_cache=False)
    assert first == again == uncached
    for caption in first:
        assert all(a != b for a, b in zip(caption, caption[1:]))  # the ban on repeats


# ------------------------------------------------------------------ other shapes of checkpoint
def _write_reference(
    tmp_path,
    state,
    *,
    textual: str,
    name: str = "captioning",
    visual: str = "torchvision::resnet18",
    feature: int = 512,
    vocab: int = 200,
    extra: dict | None = None,
):
    torch.save({"model": state, "optimizer": {}}, tmp_path / "ckpt.pth")
    cfg = {
        "MODEL": {
            "NAME": name,
            "VISUAL": {"NAME": visual, "FEATURE_SIZE": feature},
            "TEXTUAL": {"NAME": textual},
        },
        "DATA": {"VOCAB_SIZE": vocab, "TOKENIZER_MODEL": "vocab_200.model"},
        **(extra or {}),
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return str(tmp_path / "ckpt.pth"), str(tmp_path / "config.yaml")


@pytest.mark.parametrize("prenorm,layers", [(True, 2), (False, 2)])
def test_prenorm_and_deeper_heads_match_a_reference_layout_oracle(tmp_path, prenorm, layers):
    state, cnn, head = reference_style_state_dict(
        "resnet18", 200, 64, layers, 2, 128, prenorm, bicaptioning=False
    )
    norm = "prenorm" if prenorm else "postnorm"
    ckpt, cfg = _write_reference(tmp_path, state, textual=f"transdec_{norm}::L{layers}_H64_A2_F128")
    result = import_reference(ckpt, cfg, str(PARITY / "vocab_200.model"), str(tmp_path / "out"))
    model = _load(result)
    images = torch.rand(2, 3, 96, 96) * 255
    tokens = torch.tensor([[1, 50, 60, 70, 2], [1, 80, 2, 0, 0]])
    with torch.no_grad():
        mean, std = model.pixel_mean, model.pixel_std
        grid_ref = cnn((images - mean) / std).view(2, 512, 3, 3)
        grid = model.visual_features([{"image": im} for im in images])
        assert torch.allclose(grid, grid_ref, atol=1e-4)
        want = head(grid_ref, tokens)
        memory = model.textual_head.memory(model.textual_head.project_visual(grid), 0)
        hidden, _ = model.textual_head(tokens, memory, 0, causal=True, key_padding=tokens == 0)
        got = model.textual_head.logits(hidden)
    keep = tokens != 0
    assert torch.allclose(got[keep], want[keep], atol=1e-4)


def test_classification_checkpoint_imports_its_linear_layer(tmp_path):
    torch.manual_seed(0)
    state, _, _ = reference_style_state_dict("resnet18", 10, 8, 1, 1, 8, False, False)
    state = {k: v for k, v in state.items() if k.startswith("visual.")}
    state["textual.output.weight"] = torch.randn(81, 512)
    state["textual.output.bias"] = torch.randn(81)
    ckpt, cfg = _write_reference(tmp_path, state, textual="none", name="multilabel_classification")
    result = import_reference(ckpt, cfg, None, str(tmp_path / "out"))
    model = _load(result)
    assert torch.equal(model.classifier.weight, state["textual.output.weight"])
    assert model.task == "multilabel_classification"


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {
                "extra": {
                    "MODEL": {
                        "NAME": "captioning",
                        "VISUAL": {"NAME": "torchvision::resnet18"},
                        "TEXTUAL": {"NAME": "transdec_postnorm::L1_H64_A2_F128"},
                        "SHINY": 1,
                    }
                }
            },
            "MODEL.SHINY",
        ),
        ({"extra": {"OPTIM": {"OPTIMIZER_NAME": "adamw"}}}, "OPTIM.OPTIMIZER_NAME"),
        ({"textual": "transdec_postnorm::L1_H32_A2_F128"}, "textual_head.embedding.words.weight"),
        ({"visual": "timm::vit_b16"}, "MODEL.VISUAL.NAME"),
        ({"feature": 2048}, "MODEL.VISUAL.FEATURE_SIZE"),
    ],
)
def test_bad_imports_stop_naming_the_key(tmp_path, change, message):
    state, _, _ = reference_style_state_dict("resnet18", 200, 64, 1, 2, 128, False, False)
    kwargs = {"textual": "transdec_postnorm::L1_H64_A2_F128", **change}
    ckpt, cfg = _write_reference(tmp_path, state, **kwargs)
    with pytest.raises(ReferenceImportError, match=message.replace(".", r"\.")):
        import_reference(ckpt, cfg, str(PARITY / "vocab_200.model"), str(tmp_path / "out"))


def test_tied_tensors_that_differ_are_refused(tmp_path):
    state, _, _ = reference_style_state_dict("resnet18", 200, 64, 1, 2, 128, False, True)
    state["backward_textual.output.bias"] = state["textual.output.bias"] + 1
    ckpt, cfg = _write_reference(
        tmp_path, state, textual="transdec_postnorm::L1_H64_A2_F128", name="virtex"
    )
    with pytest.raises(ReferenceImportError, match="backward_textual.output.bias"):
        import_reference(ckpt, cfg, str(PARITY / "vocab_200.model"), str(tmp_path / "out"))


def test_translation_maps_the_schedule_and_protocol():
    t = translate_config(
        {
            "MODEL": {"NAME": "virtex"},
            "OPTIM": {
                "LR_DECAY_NAME": "multistep",
                "LR_STEPS": [10, 20],
                "CNN_LR": 0.3,
                "NUM_ITERATIONS": 30,
            },
            "DATA": {"IMAGE_TRANSFORM_TRAIN": ["random_resized_crop", "normalize"]},
        }
    )
    v = t.values
    assert v["SOLVER.LR_SCHEDULER_NAME"] == "WarmupMultiStepLR" and v["SOLVER.STEPS"] == (10, 20)
    assert v["SOLVER.BASE_LR"] == 0.3 and v["SOLVER.MAX_ITER"] == 30
    assert v["INPUT.VIRTEX.HFLIP_PROBABILITY"] == 0.0
    assert v["INPUT.VIRTEX.COLOR_JITTER.PROBABILITY"] == 0.0
    assert v["MODEL.VIRTEX.TASK"] == "bicaptioning"


def test_import_tool_cli_exit_status(tmp_path):
    shutil.copy(PARITY / "reference_config.yaml", tmp_path / "config.yaml")
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "import_reference.py"),
            "--checkpoint",
            str(tmp_path / "missing.pth"),
            "--config",
            str(tmp_path / "config.yaml"),
            "--vocab",
            str(PARITY / "vocab_200.model"),
            "--output",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "missing.pth" in proc.stderr


def test_vocabulary_defaults_to_the_one_the_config_names(tmp_path):
    """DATA.TOKENIZER_MODEL (vocab_200.model), found next to the config, when --vocab is not
    given; without it the import stops naming the option."""
    shutil.copy(PARITY / "reference_config.yaml", tmp_path / "config.yaml")
    ckpt = rebuild_parity_checkpoint(tmp_path / "reference.pth")
    with pytest.raises(ReferenceImportError, match="--vocab"):
        import_reference(str(ckpt), str(tmp_path / "config.yaml"), None, str(tmp_path / "a"))
    shutil.copy(PARITY / "vocab_200.model", tmp_path / "vocab_200.model")
    result = import_reference(str(ckpt), str(tmp_path / "config.yaml"), None, str(tmp_path / "b"))
    assert result.vocabulary and os.path.isfile(result.vocabulary)
