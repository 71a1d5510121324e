"""Caption-side complex-prompt augmentation (`data.caption_augment`): compose a multi-object caption from a sample's
scene metadata, the `.json` member of a WebDataset sample. Two forms are read:

- a synthetic scene, as `fluxtrain data synth` writes it (`Scene.to_json`):
  `{"objects": [{"color": "red", "shape": "circle", "cx": 20.5, "cy": 31.0, "r": 7.2}, …], "size": 64, …}`
- a detection-style annotation, for real data:
  `{"objects": [{"label": "car", "attributes": ["blue"], "bbox": [x0, y0, x1, y1]}, …], "width": W, "height": H}`
  (pixels, y down; "attributes" optional; "bbox" optional: an object without one is named but never related;
  "plural" optional, for nouns the English rule gets wrong: "people").

The caption names every object once: identical objects (same attributes and noun) as one count clause ("two blue
cars"); the other objects paired into relation clauses where a relation holds, strongest first; the rest as single
clauses; in random order, joined by " and ", at most three clauses (the grammar's complex form, PROMPTS.md).
Relations follow PROMPTS.md's margin rule: "A left of B" when B's centre x exceeds A's by at least one object radius
(the larger half-width of the two; half-heights for above/below), else nothing is said about the pair. For a
synthetic scene the caption is a grammar prompt that the shapes checker passes on the sample's own image.

Synthetic shards keep the true scene in their metadata even where `data synth --noise-frac` corrupted the `.txt`
caption, so a composed caption also corrects planted label noise.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass

from fluxtrain.data.prompts import FLIP, is_heldout, parse_prompt

MAX_CLAUSES = 3
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@dataclass(frozen=True)
class SceneObject:
    attrs: tuple[str, ...]
    noun: str
    plural: str
    box: tuple[float, float, float, float] | None  # x0, y0, x1, y1


def _plural(noun: str) -> str:
    if noun.endswith(("s", "x", "z", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2:-1] not in tuple("aeiou"):
        return noun[:-1] + "ies"
    return noun + "s"


def scene_objects(meta: dict) -> list[SceneObject]:
    """Metadata in either form → its objects; ValueError, KeyError, TypeError or AttributeError for anything else."""
    out = []
    for o in meta["objects"]:
        if "label" in o:
            noun = str(o["label"]).strip().lower()
            attrs = tuple(a for a in (str(x).strip().lower() for x in o.get("attributes") or ()) if a)
            box = tuple(float(v) for v in o["bbox"]) if o.get("bbox") is not None else None
            plural = str(o.get("plural") or _plural(noun)).strip().lower()
        else:
            cx, cy, r = float(o["cx"]), float(o["cy"]), float(o["r"])
            noun, attrs, box, plural = o["shape"], (o["color"],), (cx - r, cy - r, cx + r, cy + r), o["shape"] + "s"
        if not noun or (box is not None and (len(box) != 4 or box[2] <= box[0] or box[3] <= box[1])):
            raise ValueError(f"object without a label or with a bad box: {o}")
        out.append(SceneObject(attrs, noun, plural, box))
    return out


def relation(a: SceneObject, b: SceneObject) -> tuple[float, str] | None:
    """The strongest relation "a REL b" that holds, as (centre difference in object radii, relation); None if none."""
    if a.box is None or b.box is None:
        return None
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    dx, dy = (bx0 + bx1 - ax0 - ax1) / 2, (by0 + by1 - ay0 - ay1) / 2
    rx, ry = max(ax1 - ax0, bx1 - bx0) / 2, max(ay1 - ay0, by1 - by0) / 2
    best = max((abs(dx) / rx, "to the left of" if dx > 0 else "to the right of"),
               (abs(dy) / ry, "above" if dy > 0 else "below"))
    return best if best[0] >= 1 else None


def _phrase(o: SceneObject, n: int = 1) -> str:
    words = " ".join((*o.attrs, o.noun if n == 1 else o.plural))
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}" if n == 1 else f"{_NUMBERS.get(n, str(n))} {words}"


def compose_caption(meta: dict, rng: random.Random) -> str | None:
    """A caption naming every object of `meta` once (see the module docstring); None if it has no objects or they
    need more than MAX_CLAUSES clauses. Deterministic for a given rng state."""
    groups: dict[tuple, list[SceneObject]] = defaultdict(list)
    for o in scene_objects(meta):
        groups[(o.attrs, o.noun)].append(o)
    clauses = [_phrase(g[0], len(g)) for g in groups.values() if len(g) > 1]
    single = [g[0] for g in groups.values() if len(g) == 1]  # relations are between single objects (grammar)
    # Strongest relations first: the ones furthest from the margin survive a detector's centre and size errors.
    cands = [(-rel[0], rng.random(), i, j, rel[1]) for i, j in itertools.combinations(range(len(single)), 2)
             if (rel := relation(single[i], single[j]))]
    used: set[int] = set()
    for _, _, i, j, rel in sorted(cands):
        if i in used or j in used:
            continue
        used |= {i, j}
        a, b = single[i], single[j]
        if rng.random() < 0.5:  # "A left of B" and "B right of A" alike
            a, rel, b = b, FLIP[rel], a
        clauses.append(f"{_phrase(a)} {rel} {_phrase(b)}")
    clauses += [_phrase(o) for k, o in enumerate(single) if k not in used]
    if not clauses or len(clauses) > MAX_CLAUSES:
        return None
    rng.shuffle(clauses)
    return " and ".join(clauses)


def _heldout(caption: str) -> bool:
    try:
        return is_heldout(parse_prompt(caption))
    except ValueError:  # outside the grammar (real data): there is no held-out set to avoid
        return False


def augment_caption(meta, caption: str, p: float, seed: int, sid: int) -> tuple[str, bool]:
    """(caption, usable): with probability p the caption composed from `meta` (a dict, JSON bytes or str; None when
    the sample has none) instead of `caption`. Deterministic in (seed, sid), so a resumed run sees the same captions.
    `usable` says whether the metadata could be composed at all (present, in a known form, within MAX_CLAUSES);
    the sample keeps its caption when not, and when the composed caption is a held-out evaluation prompt."""
    rng = random.Random(f"fluxtrain-caption-augment:{seed}:{sid}")
    take = rng.random() < p
    try:
        composed = compose_caption(json.loads(meta) if isinstance(meta, (bytes, str)) else meta, rng)
    except (ValueError, KeyError, TypeError, AttributeError):  # absent or malformed metadata
        composed = None
    if composed is None:
        return caption, False
    return (composed if take and not _heldout(composed) else caption), True
