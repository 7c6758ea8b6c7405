"""A deterministic synthetic "shapes" dataset in the real COCO, COCO Captions and LVIS v1
formats, so every code path that real data takes can run on a CPU in seconds.

Layout written under ``output_dir``::

    train/000000000001.jpg ...              JPEG images, RGB, square, ``image_size`` pixels
    val/000000500001.jpg ...
    annotations/captions_{train,val}.json   COCO Captions: 5 captions per image
    annotations/instances_{train,val}.json  COCO instances: 7 shape classes with ids that are
                                            not 1..K; polygons for every object, a few
                                            iscrowd regions as uncompressed RLE (as in COCO)
    annotations/lvis_{train,val}.json       LVIS v1: 56 colour x shape classes (ids 1..56),
                                            long-tailed; frequency r/c/f from train counts
    .synthetic_complete.json                completion marker, written last

Each image holds 1-5 shapes (7 shapes, 8 named colours, 3 named sizes) on a textured
background, and every 12th image a crowd of tiny shapes. Later shapes occlude earlier ones,
but every shape stays >= 60% visible and its visible region has no holes, so polygons
describe it exactly (pixel-exact outlines for occluded shapes, the shape's own vertices
otherwise). Captions name shapes, colours, sizes, counts, absolute positions and
left/right/above/below relations, all geometrically true; swapping the words "left" and
"right" keeps them true for the mirrored image.

Why 128 px and 600/100 images by default: a ResNet's last stage is then a 4x4 grid (enough
for "left of" to be learnable), the smallest shape's circumscribed diameter is ~18 px,
generation takes a few seconds on one core, and 600 train images give the LVIS split
frequent (>100 images), common and rare categories, all of which also occur in val.
"""
import json
import logging
import os
import socket
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------- constants
# (shape, COCO category id, supercategory). Ids are deliberately not 1..K, so that code
# assuming contiguous ids fails here rather than on real COCO.
_SHAPES = [
    ("circle", 3, "round"),
    ("square", 7, "polygon"),
    ("triangle", 12, "polygon"),
    ("star", 18, "symbol"),
    ("hexagon", 25, "polygon"),
    ("cross", 31, "symbol"),
    ("ellipse", 40, "round"),
]
SHAPE_NAMES: List[str] = [s[0] for s in _SHAPES]
SHAPE_PLURALS: Dict[str, str] = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPE_NAMES}
COCO_CATEGORIES: List[Dict[str, Any]] = [
    {"id": cid, "name": name, "supercategory": sup} for name, cid, sup in _SHAPES
]
# Saturated, well separated colours; backgrounds are muted so each stays recognisable.
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "purple": (140, 45, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES: List[str] = list(COLOURS)
# Circumscribed diameter of a shape as a fraction of the image side.
SIZES: Dict[str, Tuple[float, float]] = {
    "small": (0.14, 0.18),
    "medium": (0.22, 0.28),
    "large": (0.32, 0.40),
}
SIZE_WORDS: Dict[str, str] = {"small": "small", "medium": "medium-sized", "large": "large"}
BACKGROUNDS: Tuple[str, ...] = ("gradient", "noisy", "striped", "checkered")
NUMBER_WORDS: List[str] = ["no", "one", "two", "three", "four", "five"]
# LVIS categories: every colour x shape pair, shape-major; id = index + 1 (LVIS ids are 1..K).
LVIS_CATEGORY_NAMES: List[str] = [f"{c}_{s}" for s in SHAPE_NAMES for c in COLOUR_NAMES]

DEFAULT_NUM_TRAIN = 600
DEFAULT_NUM_VAL = 100
DEFAULT_IMAGE_SIZE = 128
MARKER_NAME = ".synthetic_complete.json"
# Bump when the output changes, so that ensure_synthetic_dataset() regenerates old data.
GENERATOR_VERSION = 2
_SPLIT_ID_BASE = {"train": 0, "val": 500000}
_MIN_VISIBLE_FRACTION = 0.6
# Centre distance (fraction of the image side) below which no relation is stated.
_RELATION_MARGIN = 0.12
_JPEG_QUALITY = 92
_FIXED_DATE = "2024-01-01 00:00:00"  # fixed, so that output bytes depend on the seed only


def _category_weights() -> np.ndarray:
    """Sampling probabilities over LVIS_CATEGORY_NAMES: long-tailed over colour x shape
    pairs, yet every shape and every colour is equally common overall, so no colour word or
    shape class is starved. Pair (shape s, colour c) starts from a weight set by its rank
    (c - s) mod 8 (rank 0: one frequent pair per shape; ranks 6-7: rare pairs); alternating
    row / column normalisation then balances the marginals."""
    rank_weight = np.array([0.16, 0.035, 0.022, 0.014, 0.01, 0.007, 0.0025, 0.002])
    s, c = np.meshgrid(np.arange(len(SHAPE_NAMES)), np.arange(len(COLOURS)), indexing="ij")
    weights = rank_weight[(c - s) % len(COLOURS)]
    for _ in range(500):
        weights = weights / weights.sum(axis=1, keepdims=True) / len(SHAPE_NAMES)
        weights = weights / weights.sum(axis=0, keepdims=True) / len(COLOURS)
    return (weights / weights.sum()).ravel()


_WEIGHTS = _category_weights()


def lvis_frequency(image_count: int) -> str:
    """LVIS frequency group of a category from its number of training images: "r" (<= 10,
    including categories absent from training), "c" (11-100) or "f" (> 100)."""
    return "r" if image_count <= 10 else ("c" if image_count <= 100 else "f")


# ---------------------------------------------------------------------------- geometry
def _shape_vertices(shape: str, cx: float, cy: float, r: float, rot: float, aspect: float):
    """Vertices (N, 2) of a shape inscribed in the circle of radius ``r`` around (cx, cy),
    in pixel-corner coordinates (image y points down)."""
    if shape in ("circle", "ellipse"):
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        pts = np.stack([np.cos(t), (aspect if shape == "ellipse" else 1.0) * np.sin(t)], 1)
    elif shape == "star":
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([radius * np.cos(t), radius * np.sin(t)], 1)
    elif shape == "cross":
        w = 0.33
        arm = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w)]
        pts = np.array(arm + [(-x, -y) for x, y in arm]) / np.hypot(1, w)  # tips on the circle
    else:
        n, start = {"square": (4, np.pi / 4), "triangle": (3, -np.pi / 2), "hexagon": (6, 0)}[
            shape
        ]
        t = start + np.arange(n) * 2 * np.pi / n
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    c, s = np.cos(rot), np.sin(rot)
    return pts @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])


def _polygon_mask(poly: List[float], size: int) -> np.ndarray:
    """Rasterise a flat polygon with pycocotools, the code that decodes annotations, so
    painted pixels and annotation masks agree exactly."""
    return mask_util.decode(mask_util.frPyObjects([poly], size, size))[:, :, 0].astype(bool)


def _outline_polygons(mask: np.ndarray) -> Tuple[List[List[float]], bool]:
    """Trace the pixel-edge outline of a binary mask.

    Returns (outer polygons as flat [x0, y0, x1, y1, ...] lists in pixel-corner coordinates,
    whether the mask has holes). Without holes, pycocotools decodes the polygons back to
    exactly ``mask``. Diagonally touching pixels end up in separate polygons.
    """
    m = np.pad(mask.astype(bool), 1)
    inside = m[1:-1, 1:-1]
    # Directed boundary edges going clockwise (on screen) around each pixel, keyed by corner.
    out: Dict[Tuple[int, int], List[Tuple[int, int]]] = {}
    for outside, (ox, oy), d in (
        (~m[:-2, 1:-1], (0, 0), (1, 0)),  # top side, walked to the right
        (~m[1:-1, 2:], (1, 0), (0, 1)),  # right side, walked down
        (~m[2:, 1:-1], (1, 1), (-1, 0)),  # bottom side, walked to the left
        (~m[1:-1, :-2], (0, 1), (0, -1)),  # left side, walked up
    ):
        for y, x in zip(*np.nonzero(inside & outside)):
            out.setdefault((int(x) + ox, int(y) + oy), []).append(d)
    polygons, has_holes = [], False
    while out:
        start = next(iter(out))
        start_dir = out[start].pop(0)
        if not out[start]:
            del out[start]
        pts, v, d = [start], start, start_dir
        while True:
            v = (v[0] + d[0], v[1] + d[1])
            options = out.get(v, []) + ([start_dir] if v == start else [])
            # Prefer turning right: where two pixels touch diagonally this keeps walking
            # around the same pixel, so every loop is a simple polygon.
            nd = next(nd for nd in ((-d[1], d[0]), d, (d[1], -d[0])) if nd in options)
            if v == start and nd == start_dir:
                break
            out[v].remove(nd)
            if not out[v]:
                del out[v]
            if nd != d:
                pts.append(v)
            d = nd
        xy = np.array(pts, dtype=np.float64)
        area = np.sum(xy[:, 0] * np.roll(xy[:, 1], -1) - np.roll(xy[:, 0], -1) * xy[:, 1])
        if area < 0:  # counter-clockwise on screen: the loop runs around a hole
            has_holes = True
        else:
            polygons.append(xy.ravel().tolist())
    return polygons, has_holes


def _bbox_of(mask: np.ndarray) -> List[float]:
    """Tight [x, y, w, h] box of a non-empty mask, in pixel-corner coordinates."""
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def _uncompressed_rle(mask: np.ndarray) -> Dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths, starting with a run of zeros), the
    encoding COCO itself uses for iscrowd regions."""
    flat = mask.ravel(order="F").astype(np.int8)
    bounds = np.concatenate([[0], np.flatnonzero(np.diff(flat)) + 1, [flat.size]])
    runs = np.diff(bounds).tolist()
    return {"counts": [0] + runs if flat[0] else runs, "size": list(mask.shape)}


# ---------------------------------------------------------------------------- scenes
def _render_background(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    """Float HxWx3 background mixing two muted mid-tones (channels ~70-205, low saturation,
    far from every object colour) with a gradient, blotchy noise, stripes or checkers."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = (rng.uniform(90, 185) + rng.uniform(-18, 18, size=3) for _ in range(2))
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = np.cos(a) * xx + np.sin(a) * yy
        t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    elif kind == "noisy":
        coarse = Image.fromarray(rng.integers(0, 256, size=(6, 6), dtype=np.uint8))
        t = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255
        t = t + rng.normal(0, 0.12, size=(size, size))
    elif kind == "striped":
        a, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.16)
        t = np.sin(2 * np.pi * (np.cos(a) * xx + np.sin(a) * yy) / period) > 0
    else:  # checkered
        cell = rng.uniform(0.07, 0.14)
        t = (np.floor(xx / cell) + np.floor(yy / cell)) % 2
    t = np.clip(np.asarray(t, dtype=np.float32), 0, 1)[..., None]
    return c0 * (1 - t) + c1 * t


def _acceptable(obj: Dict[str, Any], new_visible: np.ndarray, occluder: np.ndarray) -> bool:
    """Whether an earlier shape stays annotatable once ``occluder`` is drawn over it."""
    if new_visible.sum() < _MIN_VISIBLE_FRACTION * obj["full_area"]:
        return False
    # The region had no hole before, so a new hole would consist of occluder pixels enclosed
    # by the region: possible only if the occluder's box lies strictly inside the region's.
    # Only then is the (slower) outline traced.
    ox, oy, ow, oh = _bbox_of(occluder)
    vx, vy, vw, vh = _bbox_of(new_visible)
    if ox > vx and oy > vy and ox + ow < vx + vw and oy + oh < vy + vh:
        return not _outline_polygons(new_visible)[1]
    return True


def _sample_objects(rng: np.random.Generator, size: int, forced: List[int]):
    """Place 1-5 shapes; ``forced`` holds LVIS category indices to use first (consumed).

    Returns (objects in drawing order, their visible boolean masks).
    """
    n_target = int(rng.integers(1, 6))
    categories: List[int] = []
    while len(categories) < n_target:
        cat = forced.pop(0) if forced else int(rng.choice(len(_WEIGHTS), p=_WEIGHTS))
        # Groups of identical shapes give captions something to count ("two red circles").
        repeat = 1 + (int(rng.integers(1, 3)) if rng.random() < 0.25 else 0)
        categories += [cat] * min(repeat, n_target - len(categories))
    objects: List[Dict[str, Any]] = []
    visible: List[np.ndarray] = []
    for cat in categories:
        shape, colour = SHAPE_NAMES[cat // len(COLOURS)], COLOUR_NAMES[cat % len(COLOURS)]
        size_name = str(rng.choice(list(SIZES), p=[0.35, 0.35, 0.3]))
        tilt = 0.2 if shape in ("square", "triangle", "cross") else np.pi  # keep them upright
        for _ in range(30):  # rejection sampling of the placement
            r = rng.uniform(*SIZES[size_name]) * size / 2
            cx, cy = rng.uniform(r + 1, size - r - 1, size=2)
            rot, aspect = rng.uniform(-tilt, tilt), rng.uniform(0.5, 0.62)
            poly = _shape_vertices(shape, cx, cy, r, rot, aspect).ravel().round(2).tolist()
            full = _polygon_mask(poly, size)
            new_visible = [v & ~full for v in visible]
            if all(_acceptable(o, v, full) for o, v in zip(objects, new_visible)):
                break
        else:
            continue  # no room left for this shape: the scene keeps fewer shapes
        objects.append(
            {
                "lvis_index": cat,
                "shape": shape,
                "colour": colour,
                "size": size_name,
                "center": [round(float(cx), 2), round(float(cy), 2)],
                "radius": round(float(r), 2),
                "polygon": poly,
                "full_area": int(full.sum()),
            }
        )
        visible = new_visible + [full]
    return objects, visible


def _sample_crowd(rng: np.random.Generator, size: int, visible: List[np.ndarray]):
    """A cluster of 6-12 tiny shapes of one category, drawn under the shapes. COCO gets one
    iscrowd region for it, LVIS marks its category as not exhaustively annotated.

    Returns (crowd description, its visible mask), or None when there was no room.
    """
    cat = int(rng.choice(len(_WEIGHTS), p=_WEIGHTS))
    shape, colour = SHAPE_NAMES[cat // len(COLOURS)], COLOUR_NAMES[cat % len(COLOURS)]
    occupied = np.logical_or.reduce(visible)
    for _ in range(20):
        half = rng.uniform(0.12, 0.17) * size
        cx, cy = rng.uniform(half + 1, size - half - 1, size=2)
        union = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(6, 13))):
            r = max(2.5, rng.uniform(0.025, 0.035) * size)
            px, py = rng.uniform(cx - half + r, cx + half - r, size=2)
            poly = _shape_vertices(shape, px, py, r, rng.uniform(-0.3, 0.3), 0.6)
            union |= _polygon_mask(poly.ravel().tolist(), size)
        crowd_visible = union & ~occupied
        if crowd_visible.sum() >= max(20, _MIN_VISIBLE_FRACTION * union.sum()):
            center = [round(float(cx), 2), round(float(cy), 2)]
            info = {"lvis_index": cat, "shape": shape, "colour": colour, "center": center}
            return info, crowd_visible
    return None


# ---------------------------------------------------------------------------- captions
def _noun_phrase(obj: Dict[str, Any], with_size: bool) -> str:
    words = ([SIZE_WORDS[obj["size"]]] if with_size else []) + [obj["colour"], obj["shape"]]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _join(items: List[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(center: List[float], image_size: int) -> str:
    """Words for where a centre (x, y) lies: left / right beyond 10% off the vertical
    midline, top / bottom likewise, e.g. "in the top left corner", "in the middle"."""
    x, y = center[0] / image_size, center[1] / image_size
    h = "left" if x < 0.4 else ("right" if x > 0.6 else None)
    v = "top" if y < 0.4 else ("bottom" if y > 0.6 else None)
    if h and v:
        return f"in the {v} {h} corner"
    return f"on the {h} side" if h else (f"at the {v}" if v else "in the middle")


def spatial_relation(a: List[float], b: List[float], image_size: int) -> Optional[str]:
    """How centre ``a`` lies relative to centre ``b`` along the dominant axis: "to the left
    of", "to the right of", "above" or "below"; None when they are too close to tell."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    if max(abs(dx), abs(dy)) < _RELATION_MARGIN * image_size:
        return None
    if abs(dx) >= abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    return "above" if dy > 0 else "below"


def make_captions(
    rng: np.random.Generator,
    objects: List[Dict[str, Any]],
    background: str,
    crowd: Optional[Dict[str, Any]],
    image_size: int,
) -> List[str]:
    """Five distinct captions, each true for the scene. The first two state relations when
    two different-looking shapes are far enough apart; the others enumerate, count, locate,
    compare sizes or list colours, in varied templates and word orders."""
    groups: Dict[Tuple[str, str], List[int]] = {}
    for i, o in enumerate(objects):
        groups.setdefault((o["colour"], o["shape"]), []).append(i)
    relations = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            rel = spatial_relation(a["center"], b["center"], image_size)
            if rel and (a["colour"], a["shape"]) != (b["colour"], b["shape"]):
                relations.append((i, rel, j))
    bg = f"a {background} background"
    crowd_np = ""
    if crowd:
        crowd_np = f"a cluster of tiny {crowd['colour']} {SHAPE_PLURALS[crowd['shape']]}"

    def pick(options: list):
        return options[int(rng.integers(len(options)))]

    def listing(sizes: bool, with_crowd: bool = True) -> str:
        phrases = []
        for (colour, shape), idx in groups.items():
            if len(idx) == 1:
                phrases.append(_noun_phrase(objects[idx[0]], sizes and rng.random() < 0.5))
            else:
                phrases.append(f"{NUMBER_WORDS[len(idx)]} {colour} {SHAPE_PLURALS[shape]}")
        phrases = [phrases[k] for k in rng.permutation(len(phrases))]
        return _join(phrases + ([crowd_np] if crowd_np and with_crowd else []))

    def relation() -> Optional[str]:
        if not relations:
            return None
        i, rel, j = pick(relations)
        a, b = (_noun_phrase(objects[k], rng.random() < 0.5) for k in (i, j))
        return pick(["{a} {r} {b}", "{a} is {r} {b}", "there is {a} {r} {b}"]).format(
            a=a, r=rel, b=b
        )

    def enumeration() -> str:
        prefix = pick(["a picture of", "an image of", "a scene with", "this image shows"])
        return f"{prefix} {listing(True)}" + (f" on {bg}" if rng.random() < 0.5 else "")

    def count() -> str:
        n = len(objects)
        if n == 1 and rng.random() < 0.5:
            return f"a single {objects[0]['colour']} {objects[0]['shape']} on {bg}"
        shapes = "shape" if n == 1 else "shapes"
        if rng.random() < 0.5:
            extra = f" and {crowd_np}" if crowd_np else ""
            return f"{NUMBER_WORDS[n]} {shapes}{extra} on {bg}"
        return f"{NUMBER_WORDS[n]} {shapes}: {listing(False, with_crowd=False)}"

    def locate() -> str:
        o = pick(objects)
        where = position_phrase(o["center"], image_size)
        return f"{_noun_phrase(o, rng.random() < 0.5)} {where}" + pick(["", " of the image"])

    def compare() -> Optional[str]:
        areas = sorted((o["full_area"], k) for k, o in enumerate(objects))
        if len(areas) >= 2 and rng.random() < 0.5 and areas[-1][0] >= 1.3 * areas[-2][0]:
            return f"the largest shape is {_noun_phrase(objects[areas[-1][1]], False)}"
        if len(areas) >= 2 and areas[0][0] * 1.3 <= areas[1][0]:
            return f"the smallest shape is {_noun_phrase(objects[areas[0][1]], False)}"
        return None

    def colours() -> str:
        names = _join(list(dict.fromkeys(o["colour"] for o in objects)))
        return f"{names} {'shape' if len(objects) == 1 else 'shapes'} on {bg}"

    def compact() -> str:
        return listing(False) + (f" on {bg}" if rng.random() < 0.3 else "")

    templates = [enumeration, count, locate, compare, colours, compact, relation]
    captions: List[str] = []
    for attempt in range(300):
        text = (relation if len(captions) < 2 and attempt < 20 else pick(templates))()
        if text:
            text = text[0].upper() + text[1:] + "."
            if text not in captions:
                captions.append(text)
        if len(captions) == 5:
            return captions
    raise RuntimeError(f"Could not make 5 distinct captions for the scene {objects}")


# ---------------------------------------------------------------------------- annotations
def _make_image(rng: np.random.Generator, size: int, forced: List[int], with_crowd: bool):
    """Sample and paint one scene. Returns (uint8 HxWx3 image, scene dict, visible masks of
    the objects, visible mask of the crowd or None)."""
    background = str(rng.choice(BACKGROUNDS))
    canvas = _render_background(rng, background, size)
    objects, visible = _sample_objects(rng, size, forced)
    crowd = _sample_crowd(rng, size, visible) if with_crowd else None
    crowd_info, crowd_mask = crowd if crowd else (None, None)
    painted = ([crowd] if crowd else []) + list(zip(objects, visible))
    for obj, mask in painted:
        # A little jitter per shape, so each colour word covers a range of RGB values.
        canvas[mask] = np.array(COLOURS[obj["colour"]]) + rng.uniform(-12, 12, size=3)
    canvas += rng.normal(0, 4, size=canvas.shape)
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    scene = {"background": background, "objects": objects, "crowd": crowd_info}
    return image, scene, visible, crowd_mask


def _segmentation(obj: Dict[str, Any], visible: np.ndarray) -> List[List[float]]:
    """Polygons of the visible region: the shape's own vertices when nothing covers it,
    else the exact pixel outline of what is left."""
    if int(visible.sum()) == obj["full_area"]:
        return [obj["polygon"]]
    polygons, has_holes = _outline_polygons(visible)
    if has_holes or not polygons:  # excluded by _acceptable(): reaching this is a bug
        raise RuntimeError(f"The visible region of {obj} cannot be written as polygons")
    return polygons


def _coco_category_id(shape: str) -> int:
    return COCO_CATEGORIES[SHAPE_NAMES.index(shape)]["id"]


def _annotate(image_id, scene, visible, crowd_mask, rng, size, counters):
    """COCO annotations, LVIS annotations and LVIS image fields of one painted scene. Area
    and bbox come from decoding the written segmentation, so they match what pycocotools and
    Detectron2 decode."""
    coco, lvis, present = [], [], set()
    for obj, mask in zip(scene["objects"], visible):
        polygons = _segmentation(obj, mask)
        decoded = mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, size, size)))
        area, bbox = int(decoded.sum()), _bbox_of(decoded)
        obj.update(visible_area=area, bbox=bbox)
        counters["object"] += 1
        common = {"id": counters["object"], "image_id": image_id, "area": area, "bbox": bbox}
        # As in real COCO, every non-crowd object is a polygon (Detectron2's default
        # INPUT.MASK_FORMAT "polygon" cannot read RLE for them); RLE is for crowds only.
        category = _coco_category_id(obj["shape"])
        coco.append({**common, "category_id": category, "segmentation": polygons, "iscrowd": 0})
        lvis.append({**common, "category_id": obj["lvis_index"] + 1, "segmentation": polygons})
        present.add(obj["lvis_index"] + 1)
    not_exhaustive = []
    if scene["crowd"] is not None:
        counters["object"] += 1
        coco.append(
            {
                "id": counters["object"],
                "image_id": image_id,
                "category_id": _coco_category_id(scene["crowd"]["shape"]),
                "segmentation": _uncompressed_rle(crowd_mask),
                "area": int(crowd_mask.sum()),
                "bbox": _bbox_of(crowd_mask),
                "iscrowd": 1,
            }
        )
        # LVIS has no crowd annotations: the category is in the image but not exhaustively
        # annotated there.
        not_exhaustive = [scene["crowd"]["lvis_index"] + 1]
    # Negative categories: a sample of those verified absent (no shape, no crowd).
    absent = sorted(set(range(1, len(LVIS_CATEGORY_NAMES) + 1)) - present - set(not_exhaustive))
    negatives = sorted(int(c) for c in rng.choice(absent, size=min(6, len(absent)), replace=False))
    lvis_fields = {"not_exhaustive_category_ids": not_exhaustive, "neg_category_ids": negatives}
    return coco, lvis, lvis_fields


def _generate_split(split, num_images, size, seed, output_dir, forced, progress, counters):
    """Paint, save and annotate one split. Returns its json lists and scene descriptions."""
    os.makedirs(os.path.join(output_dir, split), exist_ok=True)
    names = ("images", "captions", "coco", "lvis", "lvis_images", "scenes")
    out: Dict[str, list] = {k: [] for k in names}
    indices = range(num_images)
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc=f"synthetic {split}", unit="img")
    for i in indices:
        # One generator per image: no image depends on another's random draws.
        rng = np.random.default_rng([seed, list(_SPLIT_ID_BASE).index(split), i])
        image_id = _SPLIT_ID_BASE[split] + 1 + 3 * i  # sparse ids, like COCO's
        file_name = f"{image_id:012d}.jpg"
        # Every 12th image (from the 6th on) has a crowd, so even tiny splits have one.
        image, scene, visible, crowd_mask = _make_image(rng, size, forced, i % 12 == 5)
        path = os.path.join(output_dir, split, file_name)
        Image.fromarray(image).save(path, format="JPEG", quality=_JPEG_QUALITY)
        # LVIS v1 image records have no file_name: Detectron2 takes "<split>/<file>" from the
        # last two parts of coco_url.
        record = {
            "id": image_id,
            "height": size,
            "width": size,
            "license": 1,
            "coco_url": f"http://synthetic.invalid/{split}/{file_name}",
            "date_captured": _FIXED_DATE,
        }
        out["images"].append({**record, "file_name": file_name})
        for text in make_captions(rng, scene["objects"], scene["background"], scene["crowd"], size):
            counters["caption"] += 1
            caption = {"id": counters["caption"], "image_id": image_id, "caption": text}
            out["captions"].append(caption)
        coco, lvis, lvis_fields = _annotate(
            image_id, scene, visible, crowd_mask, rng, size, counters
        )
        out["coco"] += coco
        out["lvis"] += lvis
        out["lvis_images"].append({**record, **lvis_fields})
        out["scenes"].append({"image_id": image_id, "file_name": file_name, **scene})
    return out


def _lvis_categories(train_annotations: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """LVIS v1 category records; counts and frequency come from the train split."""
    images: Dict[int, set] = {c: set() for c in range(1, len(LVIS_CATEGORY_NAMES) + 1)}
    instances = dict.fromkeys(images, 0)
    for ann in train_annotations:
        images[ann["category_id"]].add(ann["image_id"])
        instances[ann["category_id"]] += 1
    return [
        {
            "id": c,
            "name": name,
            "synonyms": [name],
            "synset": f"{name}.n.01",
            "def": f"a {name.replace('_', ' ')} drawn on a synthetic image",
            "frequency": lvis_frequency(len(images[c])),
            "image_count": len(images[c]),
            "instance_count": instances[c],
        }
        for c, name in enumerate(LVIS_CATEGORY_NAMES, start=1)
    ]


def _write_json(path: str, obj: Any) -> None:
    # Sorted keys and fixed separators: the same content always gives the same bytes.
    with open(path, "w") as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))


def _write_split(output_dir: str, split: str, data: Dict[str, list], lvis_categories: list):
    """Write the three json files of a split; returns its entry of the summary."""
    paths = {
        k: os.path.join(output_dir, "annotations", f"{k}_{split}.json")
        for k in ("captions", "instances", "lvis")
    }
    header = {
        "info": {
            "description": "virtex-d2 synthetic shapes",
            "version": str(GENERATOR_VERSION),
            "year": 2024,
            "contributor": "virtex_d2",
            "date_created": _FIXED_DATE,
        },
        "licenses": [
            {
                "id": 1,
                "name": "CC0 1.0",
                "url": "https://creativecommons.org/publicdomain/zero/1.0/",
            }
        ],
    }
    coco_images = {**header, "images": data["images"]}
    _write_json(paths["captions"], {**coco_images, "annotations": data["captions"]})
    _write_json(
        paths["instances"],
        {**coco_images, "annotations": data["coco"], "categories": COCO_CATEGORIES},
    )
    _write_json(
        paths["lvis"],
        {
            **header,
            "images": data["lvis_images"],
            "annotations": data["lvis"],
            "categories": lvis_categories,
        },
    )
    crowd = sum(a["iscrowd"] for a in data["coco"])
    return {
        "num_images": len(data["images"]),
        "num_objects": len(data["coco"]) - crowd,
        "num_rle": sum(isinstance(a["segmentation"], dict) for a in data["coco"]),
        "num_crowd": crowd,
        "num_captions": len(data["captions"]),
        "image_dir": os.path.join(output_dir, split),
        **{f"{k}_json": path for k, path in paths.items()},
    }


def generate_synthetic_dataset(
    output_dir: str,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_val: int = DEFAULT_NUM_VAL,
    image_size: int = DEFAULT_IMAGE_SIZE,
    seed: int = 0,
    progress: bool = False,
    return_scenes: bool = False,
) -> Dict[str, Any]:
    """Write the synthetic shapes dataset under ``output_dir`` (layout in the module
    docstring). The same arguments always give byte-identical files.

    Args:
        output_dir: created if missing; existing files of the same names are overwritten.
        num_train, num_val: number of images per split (>= 1).
        image_size: side of the square images in pixels (>= 64).
        seed: seeds everything random.
        progress: show a tqdm progress bar per split.
        return_scenes: add the scene of every image under ``"scenes"``: {split: [{"image_id",
            "file_name", "background", "crowd": None or {"shape", "colour", "center"},
            "objects": [{"shape", "colour", "size", "center": [x, y] (pixels), "radius",
            "polygon" (full outline), "full_area", "visible_area", "bbox": [x, y, w, h] of
            the visible part, "lvis_index"}, ...] in drawing order}, ...]}.

    Returns:
        ``{"output_dir", "image_size", "seed", "seconds", "splits": {split: {"num_images",
        "num_objects", "num_rle", "num_crowd", "num_captions", "image_dir", "captions_json",
        "instances_json", "lvis_json"}}, "lvis_frequency": {split: {"r", "c", "f": number of
        categories of the group with annotations in the split}}}``, plus "scenes" if asked.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f"num_train and num_val must be >= 1, got {num_train} and {num_val}")
    if image_size < 64:
        raise ValueError(f"image_size must be >= 64 to keep shapes visible, got {image_size}")
    start = time.perf_counter()
    marker = os.path.join(output_dir, MARKER_NAME)
    if os.path.exists(marker):
        os.remove(marker)  # the directory is incomplete until this generation finishes
    os.makedirs(os.path.join(output_dir, "annotations"), exist_ok=True)
    # Every LVIS category is put into the train split once first, so none has zero images.
    forced = [int(c) for c in np.random.default_rng([seed, 99]).permutation(len(_WEIGHTS))]
    counters = {"caption": 0, "object": 0}  # ids are unique across splits, as in COCO
    splits = {}
    for split, num in (("train", num_train), ("val", num_val)):
        forced_here = forced if split == "train" else []
        splits[split] = _generate_split(
            split, num, image_size, seed, output_dir, forced_here, progress, counters
        )
    lvis_categories = _lvis_categories(splits["train"]["lvis"])
    summary: Dict[str, Any] = {"output_dir": output_dir, "image_size": image_size, "seed": seed}
    summary["splits"], summary["lvis_frequency"] = {}, {}
    for split, data in splits.items():
        summary["splits"][split] = _write_split(output_dir, split, data, lvis_categories)
        groups: Dict[str, set] = {"r": set(), "c": set(), "f": set()}
        for ann in data["lvis"]:
            groups[lvis_categories[ann["category_id"] - 1]["frequency"]].add(ann["category_id"])
        summary["lvis_frequency"][split] = {k: len(v) for k, v in groups.items()}
    if return_scenes:
        summary["scenes"] = {split: data["scenes"] for split, data in splits.items()}
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "seed": seed}
    _write_json(marker, {"version": GENERATOR_VERSION, **params})  # last: marks completion
    summary["seconds"] = round(time.perf_counter() - start, 2)
    return summary


# ---------------------------------------------------------------------------- on demand
def is_synthetic_dataset_complete(root: str) -> bool:
    """Whether ``root`` holds a finished generation by this version of the generator."""
    try:
        with open(os.path.join(root, MARKER_NAME)) as f:
            return json.load(f).get("version") == GENERATOR_VERSION
    except (OSError, ValueError, AttributeError):
        return False


def _lock_is_stale(lock_dir: str) -> bool:
    """A lock is stale when its owner ran on this host and is gone, or when it got no owner
    file within a minute (its creator died right after mkdir)."""
    try:
        with open(os.path.join(lock_dir, "owner")) as f:
            host, pid = f.read().split()
    except (OSError, ValueError):
        try:
            return time.time() - os.path.getmtime(lock_dir) > 60
        except OSError:
            return False  # the lock is gone: the caller simply retries
    if host != socket.gethostname():
        return False  # cannot tell from here; ensure_synthetic_dataset's timeout applies
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError):
        pass
    return False


def _remove_lock(lock_dir: str) -> None:
    for remove, path in ((os.remove, os.path.join(lock_dir, "owner")), (os.rmdir, lock_dir)):
        try:
            remove(path)
        except FileNotFoundError:
            pass


def ensure_synthetic_dataset(root: str, wait_timeout_s: float = 900.0) -> str:
    """Generate the synthetic dataset with the default arguments under ``root`` unless a
    complete one is there; returns ``root``.

    Several processes (e.g. the ranks of one job) may call this at once: the lock directory
    ``<root>.lock``, created by the atomic ``mkdir``, lets one of them generate while the
    others wait for the completion marker. An interrupted generation has no marker and is
    redone; a lock left by a dead process on this host is removed.
    """
    if is_synthetic_dataset_complete(root):
        return root
    lock_dir = os.path.abspath(root).rstrip(os.sep) + ".lock"
    os.makedirs(os.path.dirname(lock_dir), exist_ok=True)
    deadline = time.monotonic() + wait_timeout_s
    while True:
        try:
            os.mkdir(lock_dir)
            break
        except FileExistsError:
            if is_synthetic_dataset_complete(root):
                return root
            if _lock_is_stale(lock_dir):
                logger.warning("Removing the stale lock %s of an interrupted generation", lock_dir)
                _remove_lock(lock_dir)
            elif time.monotonic() > deadline:
                raise TimeoutError(
                    f"Waited {wait_timeout_s:.0f}s for another process to generate the "
                    f"synthetic dataset under {root}. If no process is generating it, delete "
                    f"{lock_dir} and retry."
                )
            else:
                time.sleep(0.5)
    try:
        with open(os.path.join(lock_dir, "owner"), "w") as f:
            f.write(f"{socket.gethostname()} {os.getpid()}")
        if not is_synthetic_dataset_complete(root):  # another process may have just finished
            logger.info(
                "Synthetic dataset not found in %s: generating it there (%d train / %d val "
                "images of %d px)",
                os.path.abspath(root),
                DEFAULT_NUM_TRAIN,
                DEFAULT_NUM_VAL,
                DEFAULT_IMAGE_SIZE,
            )
            summary = generate_synthetic_dataset(root)
            logger.info("Generated the synthetic dataset in %.1fs", summary["seconds"])
    finally:
        _remove_lock(lock_dir)
    return root
