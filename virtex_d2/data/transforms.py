"""Pretraining augmentations as Detectron2 ``Augmentation``s, and the caption-aware flip.

Detectron2 v0.6 has no random-resized crop, centre crop or colour jitter; each is defined once
here. Images are HxWx3 uint8 numpy arrays (RGB) as produced by ``detection_utils.read_image``.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence

import cv2
import numpy as np
import torch
from detectron2.data import transforms as T
from PIL import Image

_bilinear_aa = torch.ops.aten._upsample_bilinear2d_aa
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def swap_left_right(caption: str) -> str:
    """Swap the whole words "left" and "right" (any case), leaving e.g. "bright" untouched.

    The reference implementation replaced substrings, turning "bright" into "bleft".
    """

    def _swap(m: re.Match) -> str:
        word = m.group(0)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(_swap, caption)


def was_flipped(transforms: T.TransformList) -> bool:
    """Whether an odd number of horizontal flips was applied (so the caption must change)."""
    flips = sum(isinstance(t, T.HFlipTransform) for t in transforms.transforms)
    return flips % 2 == 1


class LinearResizeTransform(T.Transform):
    """Bilinear resize without antialiasing: OpenCV's ``INTER_LINEAR`` (half-pixel centres),
    which the reference implementation's albumentations pipeline calls. Pillow's bilinear
    (Detectron2's ``ResizeTransform``) widens its filter when shrinking, which blurs more; the
    two differ visibly for large downscales."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if (img.shape[0], img.shape[1]) == (self.new_h, self.new_w):
            return img
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        # OpenCV drops a trailing axis of length 1.
        return out.reshape(self.new_h, self.new_w, *img.shape[2:])

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return T.ResizeTransform(
            self.h, self.w, self.new_h, self.new_w, Image.NEAREST
        ).apply_segmentation(segmentation)


class AntialiasedResizeTransform(T.ResizeTransform):
    """Detectron2's Pillow bilinear resize (antialiased: the triangle filter widens by the shrink
    factor), with uint8 images through torch's kernel for that filter: within one grey level
    of Pillow's and about four times faster on one thread."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__(h, w, new_h, new_w, Image.BILINEAR)

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        if (img.shape[0], img.shape[1]) == (self.new_h, self.new_w):
            return img
        if img.dtype != np.uint8 or img.ndim not in (2, 3) or interp not in (None, self.interp):
            return super().apply_image(img, interp)
        # A contiguous HWC array is a channels-last NCHW tensor: the layout of the fast kernel.
        x = torch.from_numpy(np.ascontiguousarray(img).reshape(img.shape[0], img.shape[1], -1))
        # The op behind F.interpolate(mode="bilinear", antialias=True), without its 60 µs of
        # argument checks (a test holds the two equal).
        planes = _bilinear_aa(x.permute(2, 0, 1)[None], [self.new_h, self.new_w], False)[0]
        planes = planes.numpy()
        if img.ndim == 2:
            return planes[0]
        # The kernel returns planes; OpenCV interleaves them several times faster than numpy.
        return cv2.merge(list(planes)).reshape(self.new_h, self.new_w, img.shape[2])


def resize_transform(h: int, w: int, new_h: int, new_w: int, antialias: bool) -> T.Transform:
    """Pillow's antialiased bilinear resize, or OpenCV-style bilinear without antialiasing."""
    if antialias:
        return T.ResizeTransform(h, w, new_h, new_w, Image.BILINEAR)
    return LinearResizeTransform(h, w, new_h, new_w)


class ResizeShorterSide(T.Augmentation):
    """Resize so the shorter side is ``size`` (aspect ratio kept), antialiased or not."""

    def __init__(self, size: int, antialias: bool = True):
        super().__init__()
        self.size, self.antialias = int(size), antialias

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        scale = self.size / min(h, w)
        new_h, new_w = (
            (self.size, int(w * scale + 0.5)) if h < w else (int(h * scale + 0.5), self.size)
        )
        return resize_transform(h, w, new_h, new_w, self.antialias)


class RandomResizedCrop(T.Augmentation):
    """Crop a random area fraction and aspect ratio, then resize to ``size`` x ``size``.

    Same sampling as torchvision's ``RandomResizedCrop``: ten tries, then a centre crop with
    the aspect ratio clamped to ``ratio``. ``antialias`` False resizes like OpenCV (see
    :class:`LinearResizeTransform`).
    """

    def __init__(
        self,
        size: int,
        scale: Sequence[float] = (0.2, 1.0),
        ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
        antialias: bool = True,
    ):
        super().__init__()
        self.size, self.scale, self.ratio = int(size), tuple(scale), tuple(ratio)
        self.antialias = antialias

    def sample_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(x0, y0, crop width, crop height) for an image of ``h`` x ``w``; only the size is
        needed, so a JPEG's box can be drawn from its header before it is decoded. Draws from
        Python's ``random`` (a quarter of NumPy's per-call cost), which the training loaders
        seed per sample like NumPy's."""
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * random.uniform(*self.scale)
            aspect = math.exp(random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y0 = random.randint(0, h - ch)
                x0 = random.randint(0, w - cw)
                return x0, y0, cw, ch
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            cw, ch = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            cw, ch = int(round(h * max(self.ratio))), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def _resize(self, ch: int, cw: int) -> T.Transform:
        cls = AntialiasedResizeTransform if self.antialias else LinearResizeTransform
        return cls(ch, cw, self.size, self.size)

    def box_transform(self, box: tuple[int, int, int, int]) -> T.TransformList:
        """Crop ``box`` (as from :meth:`sample_box`), then resize it to ``size`` x ``size``."""
        x0, y0, cw, ch = box
        return T.TransformList([T.CropTransform(x0, y0, cw, ch), self._resize(ch, cw)])

    def crop_and_resize(self, image: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """``box_transform(box).apply_image(image)`` without building the transforms."""
        x0, y0, cw, ch = box
        return self._resize(ch, cw).apply_image(image[y0 : y0 + ch, x0 : x0 + cw])

    def get_transform(self, image: np.ndarray) -> T.Transform:
        return self.box_transform(self.sample_box(*image.shape[:2]))


class CenterCrop(T.Augmentation):
    """Crop the central ``size`` x ``size`` square (the image must be at least that large)."""

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        if h < self.size or w < self.size:
            raise ValueError(f"CenterCrop({self.size}) got a {w}x{h} image; resize it first")
        return T.CropTransform((w - self.size) // 2, (h - self.size) // 2, self.size, self.size)


_LEVELS = np.arange(256, dtype=np.float32)


def _blend_lut(factor: float, base: int) -> np.ndarray:
    """Pillow's ``Image.blend`` of a constant ``base`` image with the input as a table: float32
    arithmetic, clipped, truncated (``ImageEnhance`` brightness uses base 0, contrast the mean)."""
    values = np.float32(base) + np.float32(factor) * (_LEVELS - base)
    return np.clip(values, 0, 255).astype(np.uint8)


class ColorJitterTransform(T.Transform):
    """Brightness, contrast, saturation and hue changes in a fixed order; geometry unchanged.

    The operations of Pillow's ``ImageEnhance`` (what torchvision's ``ColorJitter`` does on
    images), computed with OpenCV on the uint8 array: brightness and contrast are 256-entry
    tables equal to Pillow's; saturation blends with the grey image (OpenCV's grey: one pixel
    in a thousand is one grey level off Pillow's); hue rotates H in OpenCV's full-range 8-bit
    HSV by ``round(hue * 256)`` of 256 steps. Both HSV round trips quantise: against an exact
    (``colorsys``) rotation, this one and Pillow's are off by 0.3-0.9 grey levels on average and
    by at most about 10; this one costs an eighth of Pillow's.
    """

    def __init__(
        self,
        brightness: float,
        contrast: float,
        saturation: float,
        hue: float,
        order: Sequence[int],
    ):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"colour jitter expects HxWx3 uint8 RGB, got {img.shape} {img.dtype}")
        img = np.ascontiguousarray(img)
        for op in self.order:
            if op == 0 and self.brightness != 1.0:
                img = cv2.LUT(img, _blend_lut(self.brightness, 0))
            elif op == 1 and self.contrast != 1.0:
                mean = int(cv2.mean(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY))[0] + 0.5)
                img = cv2.LUT(img, _blend_lut(self.contrast, mean))
            elif op == 2 and self.saturation != 1.0:
                grey = cv2.cvtColor(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
                # -0.499 turns OpenCV's rounding into Pillow's truncation.
                img = cv2.addWeighted(img, self.saturation, grey, 1.0 - self.saturation, -0.499)
            elif op == 3:
                # A shift of 0 steps is skipped: the HSV round trip itself is lossy.
                shift = int(round(self.hue * 256)) % 256
                if shift:
                    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV_FULL)
                    hsv[..., 0] += np.uint8(shift)  # uint8 wraps around the hue circle
                    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)
        return img

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class ColorJitter(T.Augmentation):
    """With probability ``prob``, jitter colours like torchvision's ``ColorJitter``."""

    def __init__(
        self,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.4,
        hue: float = 0.1,
        prob: float = 0.8,
    ):
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        # Python's random, like RandomResizedCrop.sample_box.
        if random.random() >= self.prob:
            return T.NoOpTransform()
        factors = [
            random.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
            random.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
            random.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
            random.uniform(-self.hue, self.hue),
        ]
        return ColorJitterTransform(*factors, order=random.sample(range(4), 4))
