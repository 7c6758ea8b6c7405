"""Reading image files: the one place that lists image extensions and decodes images.

:func:`load_image_rgb` decodes files of any size and pixel format:

- EXIF orientation is applied first, so a portrait photo stored sideways comes out upright.
- Transparency (RGBA, LA, PA, or a palette/greyscale/RGB image with a ``transparency`` entry)
  is composited on a white background, so transparent pixels do not turn black.
- 16-bit greyscale (``I;16*``) and 32-bit integer (``I``, how some 16-bit files decode) images
  are scaled from 0-65535 to 0-255; Pillow's own conversion would clip them to white.
  Float (``F``) images are min-max scaled. Every other mode goes through ``convert("RGB")``.
- Multi-frame files (GIF, TIFF) are read at their first frame.
- Anything raised while opening or decoding a file (corrupt or truncated data, an empty file,
  a non-image, an image above Pillow's ``MAX_IMAGE_PIXELS`` bomb limit) becomes an
  :class:`UnreadableImageError` naming the file and the reason, which the training loaders
  count as a bad sample and the captioning tools list as skipped.

:func:`read_image_checked` is the same decoding in a Detectron2 ``INPUT.FORMAT`` (what the
caption mapper reads training and shard images with).
"""

from __future__ import annotations

import glob
import io
import logging
import os

import cv2
import numpy as np
import torch
from detectron2.data import detection_utils as utils
from PIL import Image, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS

logger = logging.getLogger(__name__)

# torchvision's list (what ImageFolder accepts) plus GIF, which Pillow reads at its first frame.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(IMG_EXTENSIONS) + (".gif",)
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


class UnreadableImageError(Exception):
    """A file that could not be decoded as an image; ``reason`` says why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


def list_image_files(spec: str) -> list[str]:
    """Files named by ``spec``: a file, a directory (searched recursively for image extensions,
    case-insensitive) or a glob pattern (``**`` allowed; every matching file is kept, so the
    user's pattern decides). Sorted; raises ``FileNotFoundError`` when nothing matches."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = [
            os.path.join(root, name)
            for root, _, names in os.walk(spec)
            for name in names
            if name.lower().endswith(IMAGE_EXTENSIONS)
        ]
        if not files:
            raise FileNotFoundError(
                f"directory {spec} has no files ending in {'/'.join(IMAGE_EXTENSIONS)} (searched "
                "recursively, any case); pass a glob such as 'DIR/**/*.ext' for other names"
            )
        return sorted(files)
    files = sorted(p for p in glob.glob(spec, recursive=True) if os.path.isfile(p))
    if not files:
        raise FileNotFoundError(
            f"input {spec!r} is not a file or directory and matches no files as a glob pattern"
        )
    return files


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (see the module docstring for the policy)."""
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.asarray(image).astype(np.float64)
        grey = np.clip(wide, 0, 65535) * (255.0 / 65535.0)
        return Image.fromarray(grey.round().astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        flt = np.asarray(image, dtype=np.float64)
        lo, hi = float(np.nanmin(flt)), float(np.nanmax(flt))
        grey = (flt - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(flt)
        return Image.fromarray(np.nan_to_num(grey).round().astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def load_image_rgb(path: str, data: bytes | None = None) -> np.ndarray:
    """Decode ``path`` -> (H, W, 3) uint8 RGB, upright per EXIF. Raises UnreadableImageError.

    With ``data`` (the encoded file, e.g. read from a WebDataset shard), those bytes are decoded
    and ``path`` only names the image in error messages.
    """
    try:
        if (len(data) if data is not None else os.path.getsize(path)) == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        with Image.open(io.BytesIO(data) if data is not None else path) as image:
            image.load()  # Image.open is lazy: truncated data only fails here
            try:
                image = ImageOps.exif_transpose(image)
            except Exception as e:  # a damaged EXIF block should not cost the whole image
                logger.warning("%s: ignoring unreadable EXIF orientation (%s)", path, e)
            return np.asarray(_to_rgb(image))
    except UnreadableImageError:
        raise
    # Decoders of the many formats raise many types (OSError, SyntaxError, ValueError,
    # struct.error, DecompressionBombError, ...); all mean "this file is not usable".
    except Exception as e:
        raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e


def read_image_checked(file_name: str, image_format: str, data: bytes | None = None) -> np.ndarray:
    """(H, W, 3) uint8 in ``image_format`` ("RGB" or "BGR"), decoded by :func:`load_image_rgb`;
    other formats use Detectron2's reader (``L``, ``YUV-BT.601``), which has its own conversion
    rules. ``data``: the encoded image (from a shard) instead of the file ``file_name``."""
    if image_format not in ("RGB", "BGR"):
        if data is None:
            return utils.read_image(file_name, format=image_format)
        # read_image opens paths only; the same two steps on the bytes.
        with Image.open(io.BytesIO(data)) as image:
            image = utils._apply_exif_orientation(image)
            return utils.convert_PIL_to_numpy(image, image_format)
    image = load_image_rgb(file_name, data)
    return np.ascontiguousarray(image[:, :, ::-1]) if image_format == "BGR" else image


def chw_tensor(image: np.ndarray) -> torch.Tensor:
    """The contiguous CxHxW tensor of an HxWxC array (what Detectron2's models take)."""
    if image.ndim == 3 and image.dtype == np.uint8 and 2 <= image.shape[2] <= 4:
        # OpenCV's de-interleave is ~1.6x numpy's strided transpose copy for 224 px RGB.
        return torch.from_numpy(np.stack(cv2.split(np.ascontiguousarray(image))))
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
