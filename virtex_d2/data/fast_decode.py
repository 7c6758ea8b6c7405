"""Fast decoding of plain JPEGs for random-resized crops: header first, pixels after.

The training crop depends only on the image size, so it is drawn from the JPEG header before
any pixel is decoded. When the crop is at least twice the output size in both sides, libjpeg
decodes at 1/2, 1/4 or 1/8 scale in the DCT domain (the scaled crop still has the output
resolution, so no detail the output could show is lost) and Pillow resizes the crop's exact,
fractional box: 2048x1536 photos take 8.2 instead of 11.9 ms; 640x480 COCO photos rarely
qualify for 224 px crops (5% of them) and gain nothing. Decoding is OpenCV's
(``cv2.imdecode``, libjpeg-turbo straight to RGB numpy, no Pillow mode conversions); on the
plain JPEGs accepted here it gives exactly the pixels Pillow gives, and like Pillow it decodes
what it can of corrupt entropy-coded data (libjpeg then prints a warning on stderr, which
Pillow silences).

Only "plain" JPEGs take this path: 8-bit, one or three components, baseline or progressive
Huffman coding, no Adobe colour transform marker, no EXIF or XMP orientation other than
upright, ending with the end-of-image marker (a truncated file does not), and within Pillow's
decompression-bomb pixel limit. Everything else (PNG, CMYK, rotated photos, broken files,
...) returns ``None`` from :func:`probe_plain_jpeg` and goes through
``image_io.load_image_rgb``, whose policies (EXIF orientation, transparency on white, 16-bit
scaling, ``UnreadableImageError`` naming the file) then apply unchanged.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np
from detectron2.data import transforms as T
from PIL import Image

from .image_io import UnreadableImageError, load_image_rgb
from .transforms import ColorJitter, RandomResizedCrop

# SOF0-2: baseline, extended sequential and progressive, all Huffman-coded.
_PLAIN_SOF = (0xC0, 0xC1, 0xC2)
# Every other start-of-frame marker: lossless, hierarchical, arithmetic coding.
_OTHER_SOF = (0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_EXIF = b"Exif\x00\x00"
_XMP = b"http://ns.adobe.com/xap/1.0/"
_REDUCED_FLAGS = {
    1: 0,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
DRAFT_SCALES = (8, 4, 2)


def _exif_orientation(tiff: memoryview) -> int | None:
    """The orientation tag of an EXIF block's first IFD (1 if absent), None if malformed."""
    if len(tiff) < 8 or bytes(tiff[:2]) not in (b"II", b"MM"):
        return None
    order = "<" if tiff[0] == 0x49 else ">"
    magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42 or ifd + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(order + "H", tiff, ifd)
    if ifd + 2 + 12 * count > len(tiff):
        return None
    for i in range(count):
        tag, kind = struct.unpack_from(order + "HH", tiff, ifd + 2 + 12 * i)
        if tag == 0x0112:
            if kind != 3:  # SHORT; anything else is left to Pillow
                return None
            return struct.unpack_from(order + "H", tiff, ifd + 2 + 12 * i + 8)[0]
    return 1


def probe_plain_jpeg(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a plain JPEG (module docstring) from its markers, else None."""
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8" or data[-2:] != b"\xff\xd9":
        return None
    view = memoryview(data)
    size, seen_exif, pos = None, False, 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:  # start of scan: the header is over
            break
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2 or pos + 2 + length > n:
            return None
        seg = view[pos + 4 : pos + 2 + length]
        if marker in _PLAIN_SOF:
            if len(seg) < 6:
                return None
            precision, h, w, components = struct.unpack_from(">BHHB", seg)
            if precision != 8 or components not in (1, 3) or h == 0 or w == 0:
                return None
            size = (w, h)
        elif marker in _OTHER_SOF:
            return None
        elif marker == 0xE1 and bytes(seg[:6]) == _EXIF and not seen_exif:
            # Pillow reads the first EXIF block only; orientations 2-8 turn the image.
            seen_exif = True
            orientation = _exif_orientation(seg[6:])
            if orientation is None or 2 <= orientation <= 8:
                return None
        elif marker == 0xE1 and bytes(seg[: len(_XMP)]) == _XMP and b"Orientation" in seg:
            return None  # Pillow also honours an XMP orientation
        elif marker == 0xEE and bytes(seg[:5]) == b"Adobe":
            return None
        pos += 2 + length
    if size is None:
        return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and size[0] * size[1] > limit:
        return None  # Pillow's warning or DecompressionBombError decides
    return size


def draft_scale(crop_w: int, crop_h: int, out_size: int) -> int:
    """The largest DCT scale (8, 4, 2, else 1) at which the crop keeps >= ``out_size`` px in
    both sides."""
    for s in DRAFT_SCALES:
        if crop_w >= out_size * s and crop_h >= out_size * s:
            return s
    return 1


def decode_plain_jpeg(data: bytes, scale: int = 1) -> np.ndarray | None:
    """HxWx3 uint8 RGB of a JPEG accepted by :func:`probe_plain_jpeg`, decoded at 1/``scale``
    (sides rounded up, as Pillow's ``draft``); None where OpenCV cannot decode it."""
    flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
    # IMREAD_REDUCED_GRAYSCALE_s is the scale bits alone; COLOR_RGB asks for colour.
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags | _REDUCED_FLAGS[scale])
    if image is None or image.ndim != 3 or image.shape[2] != 3:
        return None
    return image


def read_bytes(path: str) -> bytes | None:
    """The file's bytes, or None where it cannot be read (the general path then says why)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _resize_box(image: np.ndarray, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    # Pillow takes the box in fractional pixels, which a DCT-scaled crop edge usually is.
    out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box)
    return np.asarray(out)


class FastCropPipeline:
    """The pretraining augmentations (random-resized crop, optional horizontal flip, optional
    colour jitter) on a plain JPEG, drawing the same random numbers in the same order as
    Detectron2's ``AugmentationList`` over the same augmentations, so for a given random state
    both give the same parameters and, without DCT scaling, the same pixels.

    ``draft``: decode at 1/2-1/8 scale when the crop allows it (module docstring; only with the
    antialiased resize: the non-antialiased one is meant to alias as the reference's did).
    """

    def __init__(
        self,
        crop: RandomResizedCrop,
        flip: T.RandomFlip | None = None,
        jitter: ColorJitter | None = None,
        draft: bool = True,
    ):
        self.crop, self.flip, self.jitter = crop, flip, jitter
        self.draft = draft and crop.antialias
        # The flip and jitter only read the shape of the image they are drawn for.
        self._cropped = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (crop.size, crop.size, 3))

    @classmethod
    def from_augmentations(
        cls, augmentations: list[T.Augmentation], draft: bool = True
    ) -> FastCropPipeline | None:
        """The pipeline for ``[RandomResizedCrop, RandomFlip(horizontal)?, ColorJitter?]``,
        None for any other list (which then runs as Detectron2 augmentations)."""
        augs = list(augmentations)
        if not augs or type(augs[0]) is not RandomResizedCrop:
            return None
        crop, flip, jitter = augs.pop(0), None, None
        if augs and type(augs[0]) is T.RandomFlip and augs[0].horizontal:
            flip = augs.pop(0)
        if augs and type(augs[0]) is ColorJitter:
            jitter = augs.pop(0)
        return None if augs else cls(crop, flip, jitter, draft)

    def __call__(self, path: str, data: bytes) -> tuple[np.ndarray, bool] | None:
        """(augmented HxWx3 uint8 RGB, whether it was flipped), or None without drawing any
        random number when ``data`` is not a plain JPEG. A broken file raises
        ``UnreadableImageError`` naming ``path``."""
        size = probe_plain_jpeg(data)
        if size is None:
            return None
        w, h = size
        box = self.crop.sample_box(h, w)
        flip = self.flip.get_transform(self._cropped) if self.flip else T.NoOpTransform()
        jitter = self.jitter.get_transform(self._cropped) if self.jitter else T.NoOpTransform()
        scale = draft_scale(box[2], box[3], self.crop.size) if self.draft else 1
        image = decode_plain_jpeg(data, scale)
        if image is not None and scale > 1 and image.shape[:2] == (-(-h // scale), -(-w // scale)):
            x0, y0, cw, ch = box
            image = _resize_box(
                image,
                (x0 / scale, y0 / scale, (x0 + cw) / scale, (y0 + ch) / scale),
                self.crop.size,
            )
        else:
            if image is None or image.shape[:2] != (h, w):
                # OpenCV refused data that passed the header checks: Pillow decides, and
                # raises UnreadableImageError for a broken file.
                image = load_image_rgb(path, data)
                if image.shape[:2] != (h, w):
                    raise UnreadableImageError(
                        path, f"decodes to {image.shape[1]}x{image.shape[0]}, header says {w}x{h}"
                    )
            image = self.crop.crop_and_resize(image, box)
        flipped = isinstance(flip, T.HFlipTransform)
        if flipped:
            # Detectron2's flip is a negative-stride view, which the next copy reads ~50x slower
            # than OpenCV writes the flipped array (220 vs 4 us for 224 px).
            image = cv2.flip(image, 1)
        return jitter.apply_image(image), flipped
