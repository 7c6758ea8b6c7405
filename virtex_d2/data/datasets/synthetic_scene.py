"""Scene drawing for the synthetic shapes dataset (see ``synthetic``): the shape, colour and
size catalogue with its long-tailed category weights, the geometry and rasterising helpers,
background rendering, sampling of shapes and crowds, and painting of one image."""

from __future__ import annotations

from typing import Any

import numpy as np
import pycocotools.mask as mask_util
from PIL import Image

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
SHAPE_NAMES: list[str] = [s[0] for s in _SHAPES]
COCO_CATEGORIES: list[dict[str, Any]] = [
    {"id": cid, "name": name, "supercategory": sup} for name, cid, sup in _SHAPES
]
# Saturated, well separated colours; backgrounds are muted so each stays recognisable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 35),
    "purple": (140, 45, 175),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLOUR_NAMES: list[str] = list(COLOURS)
# Circumscribed diameter of a shape as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.14, 0.18),
    "medium": (0.22, 0.28),
    "large": (0.32, 0.40),
}
BACKGROUNDS: tuple[str, ...] = ("gradient", "noisy", "striped", "checkered")
# LVIS categories: every colour x shape pair, shape-major; id = index + 1 (LVIS ids are 1..K).
LVIS_CATEGORY_NAMES: list[str] = [f"{c}_{s}" for s in SHAPE_NAMES for c in COLOUR_NAMES]
_MIN_VISIBLE_FRACTION = 0.6


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
        n, start = {"square": (4, np.pi / 4), "triangle": (3, -np.pi / 2), "hexagon": (6, 0)}[shape]
        t = start + np.arange(n) * 2 * np.pi / n
        pts = np.stack([np.cos(t), np.sin(t)], 1)
    c, s = np.cos(rot), np.sin(rot)
    return pts @ np.array([[c, s], [-s, c]]) * r + np.array([cx, cy])


def _polygon_mask(poly: list[float], size: int) -> np.ndarray:
    """Rasterise a flat polygon with pycocotools, the code that decodes annotations, so
    painted pixels and annotation masks agree exactly."""
    return mask_util.decode(mask_util.frPyObjects([poly], size, size))[:, :, 0].astype(bool)


def _outline_polygons(mask: np.ndarray) -> tuple[list[list[float]], bool]:
    """Trace the pixel-edge outline of a binary mask.

    Returns (outer polygons as flat [x0, y0, x1, y1, ...] lists in pixel-corner coordinates,
    whether the mask has holes). Without holes, pycocotools decodes the polygons back to
    exactly ``mask``. Diagonally touching pixels end up in separate polygons.
    """
    m = np.pad(mask.astype(bool), 1)
    inside = m[1:-1, 1:-1]
    # Directed boundary edges going clockwise (on screen) around each pixel, keyed by corner.
    out: dict[tuple[int, int], list[tuple[int, int]]] = {}
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


def _bbox_of(mask: np.ndarray) -> list[float]:
    """Tight [x, y, w, h] box of a non-empty mask, in pixel-corner coordinates."""
    ys, xs = np.nonzero(mask)
    x0, y0 = float(xs.min()), float(ys.min())
    return [x0, y0, float(xs.max()) + 1 - x0, float(ys.max()) + 1 - y0]


def _uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
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


def _acceptable(obj: dict[str, Any], new_visible: np.ndarray, occluder: np.ndarray) -> bool:
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


def _sample_objects(rng: np.random.Generator, size: int, forced: list[int]):
    """Place 1-5 shapes; ``forced`` holds LVIS category indices to use first (consumed).

    Returns (objects in drawing order, their visible boolean masks).
    """
    n_target = int(rng.integers(1, 6))
    categories: list[int] = []
    while len(categories) < n_target:
        cat = forced.pop(0) if forced else int(rng.choice(len(_WEIGHTS), p=_WEIGHTS))
        # Groups of identical shapes give captions something to count ("two red circles").
        repeat = 1 + (int(rng.integers(1, 3)) if rng.random() < 0.25 else 0)
        categories += [cat] * min(repeat, n_target - len(categories))
    objects: list[dict[str, Any]] = []
    visible: list[np.ndarray] = []
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


def _sample_crowd(rng: np.random.Generator, size: int, visible: list[np.ndarray]):
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


def _make_image(rng: np.random.Generator, size: int, forced: list[int], with_crowd: bool):
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
