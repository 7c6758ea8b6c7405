"""Pretraining augmentations as Detectron2 ``Augmentation``s, and the caption-aware flip.

Detectron2 v0.6 has no random-resized crop, centre crop or colour jitter; each is defined once
here. Images are HxWx3 uint8 numpy arrays (RGB) as produced by ``detection_utils.read_image``.
"""
from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from PIL import Image, ImageEnhance

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
    """Bilinear resize without antialiasing, like OpenCV's ``INTER_LINEAR`` (half-pixel
    centres): what the reference implementation's albumentations pipeline does. Pillow's
    bilinear (Detectron2's ``ResizeTransform``) widens its filter when shrinking, which blurs
    more; the two differ visibly for large downscales. Pixel values may differ from OpenCV's
    fixed-point arithmetic by one grey level."""

    def __init__(self, h: int, w: int, new_h: int, new_w: int):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if (img.shape[0], img.shape[1]) == (self.new_h, self.new_w):
            return img
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None].float()
        x = F.interpolate(x, size=(self.new_h, self.new_w), mode="bilinear",
                          align_corners=False, antialias=False)
        out = x[0].permute(1, 2, 0).numpy()
        if img.dtype == np.uint8:
            out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        coords[:, 0] = coords[:, 0] * (self.new_w / self.w)
        coords[:, 1] = coords[:, 1] * (self.new_h / self.h)
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return T.ResizeTransform(self.h, self.w, self.new_h, self.new_w,
                                 Image.NEAREST).apply_segmentation(segmentation)


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
        new_h, new_w = (self.size, int(w * scale + 0.5)) if h < w else (int(h * scale + 0.5),
                                                                          self.size)
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

    def _sample_box(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * np.random.uniform(*self.scale)
            aspect = math.exp(np.random.uniform(*log_ratio))
            cw = int(round(math.sqrt(target_area * aspect)))
            ch = int(round(math.sqrt(target_area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                y0 = np.random.randint(0, h - ch + 1)
                x0 = np.random.randint(0, w - cw + 1)
                return x0, y0, cw, ch
        in_ratio = w / h
        if in_ratio < min(self.ratio):
            cw, ch = w, int(round(w / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            cw, ch = int(round(h * max(self.ratio))), h
        else:
            cw, ch = w, h
        return (w - cw) // 2, (h - ch) // 2, cw, ch

    def get_transform(self, image: np.ndarray) -> T.Transform:
        h, w = image.shape[:2]
        x0, y0, cw, ch = self._sample_box(h, w)
        return T.TransformList(
            [
                T.CropTransform(x0, y0, cw, ch),
                resize_transform(ch, cw, self.size, self.size, self.antialias),
            ]
        )


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


class ColorJitterTransform(T.Transform):
    """Brightness, contrast, saturation and hue changes in a fixed order; geometry unchanged."""

    def __init__(self, brightness: float, contrast: float, saturation: float, hue: float,
                 order: Sequence[int]):
        super().__init__()
        self._set_attributes(locals())

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"colour jitter expects HxWx3 uint8 RGB, got {img.shape} {img.dtype}")
        pil = Image.fromarray(img)
        for op in self.order:
            if op == 0:
                pil = ImageEnhance.Brightness(pil).enhance(self.brightness)
            elif op == 1:
                pil = ImageEnhance.Contrast(pil).enhance(self.contrast)
            elif op == 2:
                pil = ImageEnhance.Color(pil).enhance(self.saturation)
            elif op == 3 and self.hue != 0.0:
                h, s, v = pil.convert("HSV").split()
                shift = int(round(self.hue * 255))
                h = h.point(lambda x: (x + shift) % 256)
                pil = Image.merge("HSV", (h, s, v)).convert("RGB")
        return np.asarray(pil)

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


class ColorJitter(T.Augmentation):
    """With probability ``prob``, jitter colours like torchvision's ``ColorJitter``."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 hue: float = 0.1, prob: float = 0.8):
        super().__init__()
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue jitter must be in [0, 0.5], got {hue}")
        self._init(locals())

    def get_transform(self, image: np.ndarray) -> T.Transform:
        if np.random.uniform() >= self.prob:
            return T.NoOpTransform()
        factors = [
            np.random.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness),
            np.random.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast),
            np.random.uniform(max(0.0, 1 - self.saturation), 1 + self.saturation),
            np.random.uniform(-self.hue, self.hue),
        ]
        order = [int(i) for i in np.random.permutation(4)]
        return ColorJitterTransform(*factors, order=order)
