"""The pretraining mapper's fast JPEG path (data/fast_decode.py): random draws distributed as
configured, the same pixels as the general path, DCT-scaled decoding only where it keeps the
output resolution, and the image-reading policy kept for everything else."""

from __future__ import annotations

import io
import math
import random
from unittest import mock

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from helpers import COCO_TINY, virtex_cfg
from PIL import Image

import virtex_d2.data.fast_decode as fast_decode
from virtex_d2.data.caption_mapper import CaptionDatasetMapper
from virtex_d2.data.fast_decode import FastCropPipeline, draft_scale, probe_plain_jpeg
from virtex_d2.data.image_io import UnreadableImageError, chw_tensor, load_image_rgb
from virtex_d2.data.transforms import (
    AntialiasedResizeTransform,
    ColorJitter,
    ColorJitterTransform,
    RandomResizedCrop,
)

PHOTOS = sorted((COCO_TINY / "train2017").glob("*.jpg"))
needs_photos = pytest.mark.skipif(not PHOTOS, reason="needs ../shared/data/coco_tiny")
CAPTION = "a dog left of a bright cat"


@pytest.fixture
def mapper_for(tokenizer):
    def build(crop=64, antialias=True, draft=True, flip=0.5, jitter=0.8):
        cfg = virtex_cfg(tokenizer_path=tokenizer.path, vocab_size=len(tokenizer))
        v = cfg.INPUT.VIRTEX
        v.CROP_SIZE, v.RESIZE_ANTIALIAS, v.JPEG_DRAFT = crop, antialias, draft
        v.HFLIP_PROBABILITY, v.COLOR_JITTER.PROBABILITY = flip, jitter
        return CaptionDatasetMapper(cfg, is_train=True)

    return build


def _seed(seed):
    """Both random states the augmentations draw from, as the training loaders seed them."""
    random.seed(seed)
    np.random.seed(seed)


def _general(mapper, record, seed):
    """The mapper's output through Detectron2's augmentations and Pillow's decoder."""
    fast, mapper.fast = mapper.fast, None
    try:
        _seed(seed)
        return mapper(record)
    finally:
        mapper.fast = fast


def _record(path, caption=CAPTION):
    return {"file_name": str(path), "image_id": 0, "captions": [caption]}


def _jpeg(tmp_path, name, image, **save):
    path = tmp_path / name
    image.save(path, "JPEG", **save)
    return path


def test_crop_box_area_and_aspect_distributions():
    _seed(0)
    crop = RandomResizedCrop(224, (0.2, 1.0), (3 / 4, 4 / 3))
    boxes = np.array([crop.sample_box(480, 640) for _ in range(4000)])
    area = boxes[:, 2] * boxes[:, 3] / (480 * 640)
    log_ratio = np.log(boxes[:, 2] / boxes[:, 3])
    assert area.min() >= 0.2 - 0.01 and area.max() <= 1.0 and area.max() > 0.9
    # Uniform in area up to 0.5625 = (3/4) ** 2, the largest fraction that fits a 4:3 image at
    # every aspect ratio; above, crops too tall for the image are redrawn (so the density
    # there is lower, and the lower range holds more than its share).
    counts = np.histogram(area, bins=3, range=(0.2, 0.5625))[0] / len(area)
    assert counts.max() - counts.min() < 0.03 and (area > 0.5625).mean() > 0.15
    bound = math.log(4 / 3) + 0.01  # + rounding to whole pixels
    assert np.abs(log_ratio).max() <= bound
    # Log-uniform where no crop is redrawn (larger ones favour the image's own shape).
    fits = log_ratio[area <= 0.5625]
    counts = np.histogram(fits, bins=4, range=(-bound, bound))[0] / len(fits)
    assert counts.min() > 0.2 and abs(np.median(fits)) < 0.03
    assert (boxes[:, 0] + boxes[:, 2] <= 640).all() and (boxes[:, 1] + boxes[:, 3] <= 480).all()


def test_jitter_draws_are_within_their_ranges():
    _seed(0)
    jitter = ColorJitter(0.4, 0.4, 0.4, 0.1, prob=0.8)
    image = np.zeros((8, 8, 3), np.uint8)
    drawn = [jitter.get_transform(image) for _ in range(2000)]
    applied = [t for t in drawn if isinstance(t, ColorJitterTransform)]
    assert abs(len(applied) / len(drawn) - 0.8) < 0.03
    assert all(isinstance(t, T.NoOpTransform) for t in drawn if t not in applied)
    factors = np.array([(t.brightness, t.contrast, t.saturation, t.hue) for t in applied])
    for column, (lo, hi) in enumerate([(0.6, 1.4)] * 3 + [(-0.1, 0.1)]):
        values = factors[:, column]
        assert lo <= values.min() and values.max() <= hi
        assert values.min() < lo + 0.05 * (hi - lo) and values.max() > hi - 0.05 * (hi - lo)
    assert len({tuple(t.order) for t in applied}) == 24  # every order of the four operations


@needs_photos
def test_flips_are_half_and_exactly_the_flipped_swap_left_and_right(mapper_for):
    mapper = mapper_for(crop=48, jitter=0.0, draft=False)
    photo = PHOTOS[0]
    full = load_image_rgb(str(photo))
    flipped = 0
    for seed in range(120):
        _seed(seed)
        out = mapper(_record(photo))
        _seed(seed)  # the same draws again: the box comes first
        box = mapper.fast.crop.sample_box(*full.shape[:2])
        plain = mapper.fast.crop.crop_and_resize(full, box)
        image = out["image"].permute(1, 2, 0).numpy()
        is_flipped = np.array_equal(image, plain[:, ::-1])
        assert is_flipped or np.array_equal(image, plain)
        assert out["caption"] == (CAPTION.replace("left", "right") if is_flipped else CAPTION)
        flipped += is_flipped
    assert 40 <= flipped <= 80


@needs_photos
@pytest.mark.parametrize("antialias", [True, False])
def test_fast_path_gives_the_general_paths_pixels(mapper_for, antialias):
    """Without DCT scaling, OpenCV's decode equals Pillow's and every later step is shared."""
    mapper = mapper_for(crop=96, antialias=antialias, draft=False)
    assert mapper.fast is not None
    for i, photo in enumerate(PHOTOS[::8]):
        _seed(i)
        fast = mapper(_record(photo))
        general = _general(mapper, _record(photo), i)
        assert torch.equal(fast["image"], general["image"]), photo.name
        assert fast["caption"] == general["caption"]
        _seed(i)
        assert torch.equal(mapper(_record(photo))["image"], fast["image"])  # deterministic


def test_fast_path_on_grey_progressive_subsampled_and_restart_jpegs(tmp_path, mapper_for):
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (90, 120, 3), np.uint8)
    grey = _jpeg(tmp_path, "grey.jpg", Image.fromarray(pixels[..., 0]))
    progressive = _jpeg(tmp_path, "progressive.jpg", Image.fromarray(pixels), progressive=True)
    # Chroma 4:4:4, 4:2:2, 4:2:0 (Pillow) and 4:1:1 with restart markers (OpenCV's encoder):
    # OpenCV's and Pillow's decoders must upsample chroma identically for the fast path to
    # keep the general path's pixels.
    subsampled = [
        _jpeg(tmp_path, f"sub{s}.jpg", Image.fromarray(pixels), subsampling=s) for s in (0, 1, 2)
    ]
    restart = tmp_path / "restart411.jpg"
    params = [cv2.IMWRITE_JPEG_RST_INTERVAL, 2]
    params += [cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411]
    restart.write_bytes(cv2.imencode(".jpg", pixels, params)[1].tobytes())
    mapper = mapper_for(crop=32, draft=False)
    for path in (grey, progressive, *subsampled, restart):
        assert probe_plain_jpeg(path.read_bytes()) == (120, 90)
        _seed(3)
        assert torch.equal(
            mapper(_record(path))["image"], _general(mapper, _record(path), 3)["image"]
        )


@needs_photos
def test_dct_scaled_decode_only_where_the_crop_keeps_the_output_size(mapper_for):
    """The DCT-domain downscale is a different low-pass filter from Pillow's triangle, so
    pixels differ near edges; on average by about one grey level (PSNR > 30 dB)."""
    scales, seen = [], set()
    real = fast_decode.decode_plain_jpeg

    def recording(data, scale=1):
        scales.append(scale)
        seen.add(scale)
        return real(data, scale)

    mapper = mapper_for(crop=96, jitter=0.0, flip=0.0)
    with mock.patch.object(fast_decode, "decode_plain_jpeg", recording):
        for i, photo in enumerate(PHOTOS[:24]):
            _seed(i)
            box = mapper.fast.crop.sample_box(*load_image_rgb(str(photo)).shape[:2])
            scales.clear()
            _seed(i)
            fast = mapper(_record(photo))["image"].numpy().astype(float)
            assert scales[0] == draft_scale(box[2], box[3], 96)
            assert min(box[2], box[3]) >= 96 * scales[0]
            if scales[0] > 1:
                general = _general(mapper, _record(photo), i)["image"].numpy()
                mse = np.mean((fast - general) ** 2)
                assert np.abs(fast - general).mean() < 4 and 10 * np.log10(255**2 / mse) > 30
        assert seen == {1, 2, 4}
        for kwargs in ({"draft": False}, {"antialias": False}):  # never scaled then
            other = mapper_for(crop=96, **kwargs)
            seen.clear()
            for i, photo in enumerate(PHOTOS[:24]):
                _seed(i)
                other(_record(photo))
            assert seen == {1}


def test_draft_scale_is_the_largest_that_keeps_the_output_size():
    assert draft_scale(224, 224, 224) == 1 and draft_scale(447, 900, 224) == 1
    assert draft_scale(448, 448, 224) == 2 and draft_scale(895, 900, 224) == 2
    assert draft_scale(896, 1000, 224) == 4 and draft_scale(4000, 3000, 224) == 8


def test_unusual_files_leave_the_fast_path(tmp_path):
    rgb = Image.new("RGB", (40, 30), (200, 40, 40))
    plain = _jpeg(tmp_path, "plain.jpg", rgb).read_bytes()
    assert probe_plain_jpeg(plain) == (40, 30)
    exif = rgb.getexif()
    exif[0x0112] = 6
    rotated = _jpeg(tmp_path, "rotated.jpg", rgb, exif=exif).read_bytes()
    exif[0x0112] = 1
    upright = _jpeg(tmp_path, "upright.jpg", rgb, exif=exif).read_bytes()
    cmyk = _jpeg(tmp_path, "cmyk.jpg", rgb.convert("CMYK")).read_bytes()
    png = io.BytesIO()
    rgb.save(png, "PNG")
    assert probe_plain_jpeg(upright) == (40, 30)
    for data in (rotated, cmyk, png.getvalue(), plain[: len(plain) // 2], b""):
        assert probe_plain_jpeg(data) is None
    with mock.patch.object(Image, "MAX_IMAGE_PIXELS", 1000):
        assert probe_plain_jpeg(plain) is None  # Pillow's bomb check decides


def test_broken_jpegs_raise_unreadable_image_error_naming_the_file(tmp_path, mapper_for):
    good = _jpeg(
        tmp_path, "good.jpg", Image.new("RGB", (64, 48), (10, 200, 30)), quality=95
    ).read_bytes()
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[: len(good) // 2])
    # Header and end marker intact, but the scan claims 9 components: OpenCV refuses it after
    # the header checks passed, and Pillow, which then decides, raises.
    sos = good.index(b"\xff\xda")
    bad_scan = tmp_path / "bad_scan.jpg"
    bad_scan.write_bytes(good[: sos + 4] + b"\x09" + good[sos + 5 :])
    assert probe_plain_jpeg(bad_scan.read_bytes()) == (64, 48)
    mapper = mapper_for(crop=32)
    for path in (truncated, bad_scan, tmp_path / "missing.jpg"):
        with pytest.raises(UnreadableImageError, match=path.name):
            mapper(_record(path))
    with pytest.raises(UnreadableImageError, match="shard.tar#7"):  # bytes from a shard
        mapper({**_record("shard.tar#7"), "image_bytes": good[:-40]})


def test_pipeline_only_for_the_pretraining_augmentations():
    crop = RandomResizedCrop(32)
    flip = T.RandomFlip(prob=0.5, horizontal=True, vertical=False)
    assert FastCropPipeline.from_augmentations([crop, flip, ColorJitter()]) is not None
    assert FastCropPipeline.from_augmentations([crop]) is not None
    assert FastCropPipeline.from_augmentations([flip, crop]) is None
    assert (
        FastCropPipeline.from_augmentations(
            [crop, T.RandomFlip(prob=0.5, horizontal=False, vertical=True)]
        )
        is None
    )


@needs_photos
def test_antialiased_resize_is_pillows_within_one_grey_level():
    _seed(0)
    crop = RandomResizedCrop(224)
    for photo in PHOTOS[:6]:
        image = load_image_rgb(str(photo))
        x0, y0, cw, ch = crop.sample_box(*image.shape[:2])
        part = image[y0 : y0 + ch, x0 : x0 + cw]
        ours = AntialiasedResizeTransform(ch, cw, 224, 224).apply_image(part)
        pillow = np.asarray(Image.fromarray(part).resize((224, 224), Image.BILINEAR))
        assert np.abs(ours.astype(int) - pillow).max() <= 1
        public = F.interpolate(
            torch.from_numpy(part.copy()).permute(2, 0, 1)[None],
            size=(224, 224),
            mode="bilinear",
            antialias=True,
        )
        public = public[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, public)


@needs_photos
def test_colour_jitter_matches_pillows_image_enhance():
    from PIL import ImageEnhance

    image = np.asarray(Image.open(PHOTOS[1]).convert("RGB").resize((96, 96)))
    pil = Image.fromarray(image)
    # (operation, factors, Pillow's result, tolerance: OpenCV's grey differs in a few pixels)
    cases = [
        (0, (1.3, 1, 1, 0), ImageEnhance.Brightness(pil).enhance(1.3), 0),
        (1, (1, 0.7, 1, 0), ImageEnhance.Contrast(pil).enhance(0.7), 0),
        (2, (1, 1, 1.35, 0), ImageEnhance.Color(pil).enhance(1.35), 1),
    ]
    for op, factors, expected, tolerance in cases:
        out = ColorJitterTransform(*factors, order=[op]).apply_image(image)
        assert np.abs(out.astype(int) - np.asarray(expected)).max() <= tolerance
    # Hue: a rotation by 0.1 of the circle moves a pure red towards yellow, keeping S and V.
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    turned = ColorJitterTransform(1, 1, 1, 0.1, order=[3]).apply_image(red)[0, 0]
    assert turned[0] == 200 and turned[2] == 0 and abs(int(turned[1]) - 120) <= 3


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_chw_tensor_is_the_contiguous_transpose_of_any_layout(channels, dtype):
    rng = np.random.default_rng(channels)
    image = (rng.random((37, 53, channels)) * 255).astype(dtype)
    # Flipped, cropped and sliced views: the layouts the augmentations hand over.
    for view in (image, image[:, ::-1], image[3:30, 5:41], image[::-1]):
        out = chw_tensor(view)
        assert out.is_contiguous() and out.dtype == torch.from_numpy(view.copy()).dtype
        assert torch.equal(out, torch.from_numpy(view.transpose(2, 0, 1).copy()))
