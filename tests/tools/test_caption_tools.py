"""Captioning image files and per-word attention maps (caption_images, visualize_attention)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from helpers import COCO_TINY, load_tool, make_tokenizer, needs_coco_tiny, virtex_cfg
from PIL import Image

from virtex_d2.data.image_io import UnreadableImageError, list_image_files, load_image_rgb
from virtex_d2.data.tokenizer import SOS_ID, word_spans
from virtex_d2.engine.predictor import CaptionPredictor
from virtex_d2.modeling.attention import combine_attention

LAYERS = 2


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 2-layer bicaptioning model saved as config.yaml + model.pth, the model, and a
    CaptionPredictor that loaded the saved files.

    Its visual projection and cross-attention projections get a larger scale than BERT's 0.02
    (with which attention is uniform over the grid: every word's map would be the same), and
    special tokens are suppressed so captions are never empty.
    """
    root = tmp_path_factory.mktemp("caption_model")
    tokenizer = make_tokenizer(root)
    cfg = virtex_cfg("bicaptioning", layers=LAYERS, hidden=64, tokenizer_path=tokenizer.path)
    cfg.INPUT.VIRTEX.TEST_RESIZE = 72
    cfg.INPUT.VIRTEX.TEST_CROP_SIZE = 64
    cfg.MODEL.VIRTEX.DECODER.BEAM_SIZE = 2
    cfg.MODEL.VIRTEX.DECODER.MAX_LENGTH = 6
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        model.textual_head.visual_projection.weight.normal_(0.0, 0.3)
        for layer in model.textual_head.transformer.layers:
            layer.cross_attn.in_proj.weight.normal_(0.0, 0.5)
        model.textual_head.output.bias[:4] = -1e4
    DetectionCheckpointer(model, save_dir=str(root)).save("model")
    (root / "config.yaml").write_text(cfg.dump())
    return {
        "cfg": cfg,
        "model": model,
        "config": root / "config.yaml",
        "weights": root / "model.pth",
        "predictor": CaptionPredictor(cfg, str(root / "model.pth")),
    }


# ------------------------------------------------------------------------------- test files
def model_argv(trained) -> list[str]:
    """The tools' model arguments for the trained fixture."""
    return ["--config-file", str(trained["config"]), "--weights", str(trained["weights"])]


def _jpeg(path: Path, size=(40, 30), exif=None) -> Path:
    w, h = size
    arr = np.zeros((h, w, 3), np.uint8)
    arr[:, : w // 2] = (255, 0, 0)  # left half red, right half blue
    arr[:, w // 2 :] = (0, 0, 255)
    kwargs = {"exif": exif} if exif is not None else {}
    Image.fromarray(arr).save(path, quality=95, **kwargs)
    return path


def make_mixed_folder(root: Path) -> tuple[list[str], list[str]]:
    """Readable and unreadable files (names relative to root), nested and in mixed case."""
    (root / "sub").mkdir(parents=True)
    _jpeg(root / "rgb.jpg")
    _jpeg(root / "sub" / "UPPER.JPG", size=(50, 20))
    Image.fromarray(np.full((30, 20), 90, np.uint8)).save(root / "grey.png")
    rgba = np.zeros((20, 20, 4), np.uint8)
    rgba[:, :10] = (255, 0, 0, 255)  # opaque red | fully transparent black
    Image.fromarray(rgba).save(root / "rgba.png")
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8).repeat(8, 0).repeat(8, 1), "P")
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(root / "palette.gif", transparency=0)
    pal.save(root / "palette.png")
    wide = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85).astype(np.uint16)
    Image.fromarray(wide).save(root / "sub" / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _jpeg(root / "rotated.jpeg", exif=exif)
    good = [
        "rgb.jpg",
        "sub/UPPER.JPG",
        "grey.png",
        "rgba.png",
        "palette.gif",
        "palette.png",
        "sub/sixteen.png",
        "rotated.jpeg",
    ]

    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG"
    )
    (root / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "sub" / "text.jpg").write_text("this is not an image\n")
    (root / "notes.txt").write_text("not listed: no image extension\n")
    bad = ["truncated.jpg", "empty.png", "sub/text.jpg"]
    return good, bad


# ---------------------------------------------------------------------------------- loading
def test_load_image_policy(tmp_path):
    make_mixed_folder(tmp_path)
    rgb = load_image_rgb(str(tmp_path / "rgb.jpg"))
    assert rgb.shape == (30, 40, 3) and rgb.dtype == np.uint8
    # EXIF orientation 6: the stored 40x30 image is shown 30 wide, 40 high; its left (red)
    # half ends up on top.
    rot = load_image_rgb(str(tmp_path / "rotated.jpeg")).astype(int)
    assert rot.shape == (40, 30, 3)
    assert rot[5, 15, 0] > 200 > rot[5, 15, 2] and rot[35, 15, 2] > 200 > rot[35, 15, 0]
    grey = load_image_rgb(str(tmp_path / "grey.png"))
    assert grey.shape == (30, 20, 3) and (grey == 90).all()
    rgba = load_image_rgb(str(tmp_path / "rgba.png"))
    assert rgba.shape == (20, 20, 3)
    assert (rgba[:, :10] == (255, 0, 0)).all() and (rgba[:, 10:] == 255).all()  # white, not black
    gif = load_image_rgb(str(tmp_path / "palette.gif"))  # index 0 is transparent -> white
    assert (gif[0, 0] == 255).all() and tuple(gif[0, 8]) == (0, 255, 0)
    png = load_image_rgb(str(tmp_path / "palette.png"))  # same palette, nothing transparent
    assert tuple(png[0, 0]) == (0, 0, 0) and tuple(png[0, 8]) == (0, 255, 0)
    # 16-bit: 0..65195 scaled to 0..254 (Pillow's convert("RGB") would clip all but 3 to 255).
    sixteen = load_image_rgb(str(tmp_path / "sub" / "sixteen.png"))
    stored = np.asarray(Image.open(tmp_path / "sub" / "sixteen.png")).astype(float)
    assert sixteen.shape == (24, 32, 3)
    np.testing.assert_allclose(sixteen[..., 0], stored * 255 / 65535, atol=0.51)
    for name, reason in [
        ("truncated.jpg", "truncated"),
        ("empty.png", "empty file"),
        ("sub/text.jpg", "cannot identify"),
    ]:
        with pytest.raises(UnreadableImageError, match=reason) as info:
            load_image_rgb(str(tmp_path / name))
        assert info.value.path == str(tmp_path / name)


def test_list_image_files(tmp_path):
    good, bad = make_mixed_folder(tmp_path)
    listed = list_image_files(str(tmp_path))
    assert listed == sorted(str(tmp_path / n) for n in good + bad)
    assert list_image_files(str(tmp_path / "**" / "*.png")) == sorted(
        str(tmp_path / n)
        for n in ["grey.png", "rgba.png", "palette.png", "empty.png", "sub/sixteen.png"]
    )
    assert list_image_files(str(tmp_path / "rgb.jpg")) == [str(tmp_path / "rgb.jpg")]
    with pytest.raises(FileNotFoundError, match="matches no files"):
        list_image_files(str(tmp_path / "*.webp"))
    (tmp_path / "no_images").mkdir()
    (tmp_path / "no_images" / "a.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no files ending in"):
        list_image_files(str(tmp_path / "no_images"))


# ------------------------------------------------------------------------------- captioning
def test_caption_images_tool_skips_bad_files(trained, tmp_path, capsys, caplog):
    folder = tmp_path / "images"
    good, bad = make_mixed_folder(folder)
    out = tmp_path / "out" / "preds.json"
    tool = load_tool("caption_images")
    argv = [
        *model_argv(trained),
        "--input",
        str(folder),
        "--output",
        str(out),
        "--batch-size",
        "3",
    ]
    with caplog.at_level("WARNING"):
        assert tool.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["num_captioned"] == len(good) and data["num_skipped"] == len(bad)
    # All files in sorted order; each good one with a non-empty caption.
    assert [c["file_name"] for c in data["captions"]] == sorted(str(folder / n) for n in good)
    assert all(c["caption"].strip() for c in data["captions"])
    assert [s["file_name"] for s in data["skipped"]] == sorted(str(folder / n) for n in bad)
    assert all(s["error"] for s in data["skipped"])
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for name in bad:
        assert sum(str(folder / name) in w for w in warnings) == 1
    assert "captioned 8 image(s), skipped 3 unreadable file(s)" in capsys.readouterr().out

    # Batching does not change beam-search captions.
    argv_one = argv[:-2] + ["--batch-size", "1", "--num-workers", "0"]
    argv_one[argv_one.index("--output") + 1] = str(tmp_path / "one.json")
    assert tool.main(argv_one) == 0
    assert json.loads((tmp_path / "one.json").read_text())["captions"] == data["captions"]


def test_caption_images_tool_errors(trained, tmp_path, capsys):
    tool = load_tool("caption_images")
    base = [
        *model_argv(trained),
        "--output",
        str(tmp_path / "p.json"),
    ]
    assert tool.main(base + ["--input", str(tmp_path / "nothing*.jpg")]) == 1
    assert "matches no files" in capsys.readouterr().err
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    assert tool.main(base + ["--input", str(tmp_path / "bad.jpg")]) == 1  # nothing captioned
    assert json.loads((tmp_path / "p.json").read_text())["num_skipped"] == 1


@needs_coco_tiny
def test_real_photographs(trained):
    files = sorted(str(p) for p in (COCO_TINY / "val2017").glob("*.jpg"))[:3]
    assert len(files) == 3
    results = trained["predictor"].caption_files(files, batch_size=2, progress=False)
    assert [c["file_name"] for c in results.captions] == files and not results.skipped
    assert all(c["caption"] for c in results.captions)


# -------------------------------------------------------------------------------- predictor
def test_predictor_captions_an_array_as_caption_files_does(trained, tmp_path):
    predictor = trained["predictor"]
    files = [str(_jpeg(tmp_path / "a.jpg")), str(_jpeg(tmp_path / "b.jpg", size=(50, 20)))]
    written = predictor.caption_files(files, batch_size=2, num_workers=0, progress=False)
    images = [load_image_rgb(f) for f in files]
    one = predictor(images[0])
    assert one["caption"] == written.captions[0]["caption"]
    assert one["caption"] == predictor.tokenizer.decode(one["tokens"]) and one["tokens"]
    # Arrays of different sizes batch together: each is prepared to the crop size first.
    batch = predictor.caption_batch(images)
    assert [b["caption"] for b in batch] == [c["caption"] for c in written.captions]
    # The model's own inference (what Detectron2's evaluators see) agrees.
    with torch.no_grad():
        inference = predictor.model([{"image": predictor.prepare(images[1])}])[0]
    assert inference["tokens"] == batch[1]["tokens"]


def test_predictor_refuses_what_cannot_caption(trained, tmp_path):
    weights = str(trained["weights"])
    cfg = trained["cfg"].clone()
    cfg.MODEL.VIRTEX.TASK = "token_classification"
    with pytest.raises(
        ValueError,
        match="TASK is 'token_classification': only "
        "bicaptioning/captioning models generate captions",
    ):
        CaptionPredictor(cfg, weights)
    cfg = trained["cfg"].clone()
    cfg.INPUT.FORMAT = "BGR"
    with pytest.raises(ValueError, match="INPUT.FORMAT must be 'RGB'"):
        CaptionPredictor(cfg, weights)
    cfg = trained["cfg"].clone()
    with pytest.raises(FileNotFoundError, match="--weights .*nope.pth does not exist"):
        CaptionPredictor(cfg, str(tmp_path / "nope.pth"))
    cfg.MODEL.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError, match="MODEL.WEIGHTS .*nope.pth does not exist"):
        CaptionPredictor(cfg)
    cfg.MODEL.WEIGHTS = ""
    with pytest.raises(FileNotFoundError, match="no weights to load"):
        CaptionPredictor(cfg)
    cfg.MODEL.WEIGHTS = weights  # like DefaultPredictor: the config's weights by default
    assert CaptionPredictor(cfg).caption_batch([np.zeros((30, 40, 3), np.uint8)])[0]["tokens"]


# -------------------------------------------------------------------------------- attention
def _crop(trained, path) -> torch.Tensor:
    return trained["predictor"].prepare(load_image_rgb(str(path)))


@needs_coco_tiny
def test_attention_is_what_the_decoder_used(trained):
    predictor = trained["predictor"]
    model = predictor.model
    image = _crop(trained, sorted((COCO_TINY / "val2017").glob("*.jpg"))[0])
    result = predictor.attention(image)
    n = len(result.tokens)
    assert n > 0 and result.token_maps.shape == (n, 2, 2)  # 64 px / stride 32
    torch.testing.assert_close(result.token_maps.sum(dim=(1, 2)), torch.ones(n))
    torch.testing.assert_close(result.word_maps.sum(dim=(1, 2)), torch.ones(len(result.words)))
    assert result.words == result.caption.split()

    # Decode token by token with the key/value cache, as generation does, and compare.
    head = model.textual_head
    with torch.no_grad():
        features = model.visual_features([{"image": image}])
        memory = head.memory(head.project_visual(features), 0)
        caches = [dict() for _ in memory]
        inputs = [SOS_ID] + result.tokens[:-1]
        for t, tok in enumerate(inputs):
            _, weights = head(
                torch.tensor([[tok]]), memory, 0, caches=caches, start_position=t, need_weights=True
            )
            assert len(weights) == LAYERS
            expected = torch.stack([w[0, :, 0].mean(0) for w in weights]).mean(0)
            torch.testing.assert_close(result.token_maps[t].flatten(), expected)

    last = predictor.attention(image, tokens=result.tokens, layer=-1)
    assert not torch.allclose(last.token_maps, result.token_maps)
    with pytest.raises(ValueError, match="has 2 layer"):
        predictor.attention(image, layer=2)
    with pytest.raises(ValueError, match="decoder must be one of"):
        predictor.attention(image, decoder="sampling")
    empty = predictor.attention(image, tokens=[])  # the decoder emitted [EOS] at once
    assert empty.caption == "" and empty.words == [] and empty.word_maps.shape == (0, 2, 2)


@needs_coco_tiny
def test_word_maps_differ_and_merge_subwords(trained):
    predictor, tok = trained["predictor"], trained["predictor"].tokenizer
    image = _crop(trained, sorted((COCO_TINY / "val2017").glob("*.jpg"))[1])
    caption = "a red circle left of the blue square"
    tokens = tok.encode(caption)
    result = predictor.attention(image, tokens=tokens)
    assert result.words == caption.split()
    spans = word_spans(tok, tokens)
    assert any(len(positions) > 1 for _, positions in spans)  # "red" = "▁" "re" "d"
    for i, (_, positions) in enumerate(spans):
        torch.testing.assert_close(result.word_maps[i], result.token_maps[positions].mean(0))
    # Distinct words attend to distinct places (L1 distance between distributions).
    maps = result.word_maps.flatten(1)
    for i in range(len(maps)):
        for j in range(i + 1, len(maps)):
            if result.words[i] != result.words[j]:
                assert (maps[i] - maps[j]).abs().sum() > 0.05, (result.words[i], result.words[j])


def test_word_spans_special_and_bare_pieces(tokenizer):
    ids = [tokenizer.token_to_id(p) for p in ["▁a", "▁", "▁big", "▁", "re", "d"]]
    spans = word_spans(tokenizer, [ids[0], 0, ids[1], ids[2], *ids[3:]])
    assert spans == [("a", [0]), ("big", [2, 3]), ("red", [4, 5, 6])]
    assert combine_attention([torch.full((1, 2, 3, 4), 0.25)]).shape == (1, 3, 4)


@needs_coco_tiny
def test_visualize_attention_tool(trained, tmp_path, capsys):
    tool = load_tool("visualize_attention")
    image = sorted((COCO_TINY / "val2017").glob("*.jpg"))[2]
    out = tmp_path / "attention"
    argv = [
        *model_argv(trained),
        "--input",
        str(image),
        "--output",
        str(out),
        "--panel-size",
        "64",
        "--columns",
        "3",
    ]
    assert tool.main(argv) == 0
    printed = capsys.readouterr().out
    caption = re.search(r"^caption: (.*)$", printed, re.M).group(1)
    words = caption.split()
    pngs = sorted(p.name for p in out.glob("[0-9][0-9]_*.png"))
    assert len(words) > 0 and len(pngs) == len(words)
    assert pngs == [f"{i:02d}_{tool.safe_filename(w)}.png" for i, w in enumerate(words)]
    for name in pngs:
        assert Image.open(out / name).size == (64, 64 + tool.TITLE_PX)
        assert str(out / name) in printed
    sheet = Image.open(out / "caption_sheet.png")
    sheet.verify()
    rows = -(-(len(words) + 1) // 3)
    assert sheet.size == (min(len(words) + 1, 3) * 64, tool.HEADER_PX + rows * (64 + tool.TITLE_PX))
    assert tool.safe_filename("don't") == "don_t" and tool.safe_filename("...") == "word"
    crop = np.zeros((64, 64, 3), np.uint8)
    size = tool.save_caption_sheet(str(tmp_path / "empty.png"), crop, [], [], "", panel_px=64)
    assert Image.open(tmp_path / "empty.png").size == size == (64, tool.HEADER_PX + 64 + 32)

    assert tool.main(argv[:-4] + ["--layer", "5"]) == 1
    assert "has 2 layer" in capsys.readouterr().err
