"""Caption writing for the synthetic shapes dataset (see ``synthetic``): five captions per
scene naming shapes, colours, sizes, counts, absolute positions and spatial relations, all
true of the scene's geometry."""

from __future__ import annotations

from typing import Any

import numpy as np

from .synthetic_scene import SHAPE_NAMES

# ---------------------------------------------------------------------------- constants
SHAPE_PLURALS: dict[str, str] = {s: s + ("es" if s.endswith("ss") else "s") for s in SHAPE_NAMES}
SIZE_WORDS: dict[str, str] = {"small": "small", "medium": "medium-sized", "large": "large"}
NUMBER_WORDS: list[str] = ["no", "one", "two", "three", "four", "five"]
# Centre distance (fraction of the image side) below which no relation is stated.
_RELATION_MARGIN = 0.12


# ---------------------------------------------------------------------------- captions
def _noun_phrase(obj: dict[str, Any], with_size: bool) -> str:
    words = ([SIZE_WORDS[obj["size"]]] if with_size else []) + [obj["colour"], obj["shape"]]
    return ("an " if words[0][0] in "aeiou" else "a ") + " ".join(words)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def position_phrase(center: list[float], image_size: int) -> str:
    """Words for where a centre (x, y) lies: left / right beyond 10% off the vertical
    midline, top / bottom likewise, e.g. "in the top left corner", "in the middle"."""
    x, y = center[0] / image_size, center[1] / image_size
    h = "left" if x < 0.4 else ("right" if x > 0.6 else None)
    v = "top" if y < 0.4 else ("bottom" if y > 0.6 else None)
    if h and v:
        return f"in the {v} {h} corner"
    return f"on the {h} side" if h else (f"at the {v}" if v else "in the middle")


def spatial_relation(a: list[float], b: list[float], image_size: int) -> str | None:
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
    objects: list[dict[str, Any]],
    background: str,
    crowd: dict[str, Any] | None,
    image_size: int,
) -> list[str]:
    """Five distinct captions, each true for the scene. The first two state relations when
    two different-looking shapes are far enough apart; the others enumerate, count, locate,
    compare sizes or list colours, in varied templates and word orders."""
    groups: dict[tuple[str, str], list[int]] = {}
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

    def relation() -> str | None:
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

    def compare() -> str | None:
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
    captions: list[str] = []
    for attempt in range(300):
        text = (relation if len(captions) < 2 and attempt < 20 else pick(templates))()
        if text:
            text = text[0].upper() + text[1:] + "."
            if text not in captions:
                captions.append(text)
        if len(captions) == 5:
            return captions
    raise RuntimeError(f"Could not make 5 distinct captions for the scene {objects}")
