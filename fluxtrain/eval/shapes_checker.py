"""Deterministic prompt-adherence checker for the synthetic grammar (no learned model).

Pixels → nearest palette colour (background grey included; pixels far from every colour, or about as near two, are
ignored: those are blurry edges and noise) → same-colour 4-connected components → drop specks (under a quarter of
the smallest allowed object, or with no solid interior) → shape = best template (circle/square/triangle) by IoU,
sized by area and placed at the centroid → compare with the prompt: counts per colour+shape, no extra objects, and
relations by object centres ("left of": x smaller by at least the larger radius of the two; "above": same in y),
trying every assignment of look-alike objects.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from fluxtrain.data.prompts import BACKGROUND, COLORS, parse_prompt
from fluxtrain.data.synthetic import _shape_mask

_NAMES = list(COLORS) + ["background"]
_PALETTE = np.array([COLORS[c] for c in COLORS] + [BACKGROUND], np.float32)
_BG = len(_NAMES) - 1
MAX_DIST = 90.0  # a pixel this far (RGB, 0-255) from every palette colour is ignored
RATIO = 0.6  # ... and one at least 0.6 as far from the runner-up colour (a blend of two) too


@dataclass
class CheckResult:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    found: list[dict] = field(default_factory=list)


def _to_uint8(image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[0] == 3 and arr.shape[-1] != 3:  # CHW
        arr = arr.transpose(1, 2, 0)
    if np.issubdtype(arr.dtype, np.floating):  # floats: [0, 1] (map a model's [-1, 1] output yourself)
        arr = np.clip(arr.astype(np.float32) * 255, 0, 255).round()
    arr = arr.astype(np.uint8) if arr.dtype != np.uint8 else arr
    return arr[..., :3]


def classify_pixels(arr: np.ndarray) -> np.ndarray:
    """Palette index per pixel, -1 where ambiguous or off-palette."""
    x = arr.reshape(-1, 3).astype(np.float32)
    d2 = (x * x).sum(1, keepdims=True) - 2 * x @ _PALETTE.T + (_PALETTE * _PALETTE).sum(1)  # squared distances
    two = np.partition(d2, 1, axis=1)
    ok = (two[:, 0] <= MAX_DIST**2) & (two[:, 0] <= RATIO**2 * two[:, 1])
    return np.where(ok, d2.argmin(1), -1).reshape(arr.shape[:2])


def _label(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal, valid class. Label = smallest flat index in the component (min-propagation
    with pointer jumping: converges in a few passes for compact blobs). -1 outside."""
    h, w = cls.shape
    valid = cls >= 0
    big = h * w
    lab = np.where(valid, np.arange(big).reshape(h, w), big)
    same_v = valid[1:] & valid[:-1] & (cls[1:] == cls[:-1])
    same_h = valid[:, 1:] & valid[:, :-1] & (cls[:, 1:] == cls[:, :-1])
    flat_valid = valid.ravel()
    while True:
        new = lab.copy()
        m = np.minimum(lab[1:], lab[:-1])
        new[1:] = np.where(same_v, np.minimum(new[1:], m), new[1:])
        new[:-1] = np.where(same_v, np.minimum(new[:-1], m), new[:-1])
        m = np.minimum(lab[:, 1:], lab[:, :-1])
        new[:, 1:] = np.where(same_h, np.minimum(new[:, 1:], m), new[:, 1:])
        new[:, :-1] = np.where(same_h, np.minimum(new[:, :-1], m), new[:, :-1])
        flat = new.ravel()
        for _ in range(3):
            flat[flat_valid] = flat[flat[flat_valid]]
        if np.array_equal(new, lab):
            return np.where(valid, lab, -1)
        lab = new


def _core(cls: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood is all their class: thin blurry rims and noise have none."""
    p = np.pad(cls, 1, constant_values=-1)
    h, w = cls.shape
    core = cls >= 0
    for dy in range(3):
        for dx in range(3):
            core &= p[dy:dy + h, dx:dx + w] == cls
    return core


def _fit(mask: np.ndarray, y0: int, x0: int) -> dict:
    """Best-matching shape for one blob (crop `mask` at offset y0, x0): each shape's template, sized from the blob's
    area and placed at its centroid, scored by IoU. Area and centroid shrug off blurry rims and stray pixels that
    would throw bounding-box features (fill, corners) at 64 px."""
    ys, xs = np.nonzero(mask)
    area = len(ys)
    my, mx = ys.mean() + 0.5 + y0, xs.mean() + 0.5 + x0
    gy, gx = np.mgrid[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
    best = {"iou": -1.0}
    for shape, r0 in (("circle", np.sqrt(area / np.pi)), ("square", np.sqrt(area) / 2),
                      ("triangle", np.sqrt(area / 2))):
        for r in (r0, r0 * 1.06):  # blurry blobs lose their rims: also try a size up
            cy = my - r / 3 if shape == "triangle" else my  # a triangle's centroid sits r/3 below its box centre
            t = _shape_mask(shape, mx, cy, r, gx, gy)
            iou = (t & mask).sum() / max((t | mask).sum(), 1)
            if iou > best["iou"]:
                best = {"shape": shape, "cx": round(float(mx), 2), "cy": round(float(cy), 2),
                        "r": round(float(r), 2), "iou": round(float(iou), 3)}
    return best


def detect(image) -> list[dict]:
    """Objects in an image: colour, shape, centre and radius of the best-fitting template (pixel units, as
    Obj), area, template IoU."""
    arr = _to_uint8(image)
    size = min(arr.shape[:2])
    cls = classify_pixels(arr)
    cls = np.where(cls == _BG, -1, cls)
    lab = _label(cls)
    min_area = 0.25 * np.pi / 4 * (size / 8) ** 2  # a quarter of the smallest allowed object
    core = _core(cls)
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    found = []
    for lid, n in zip(ids, counts):
        if n < min_area:
            continue
        m = lab == lid
        if (core & m).sum() < min_area / 4:
            continue
        ys, xs = np.nonzero(m)
        pad = 2 + (max(np.ptp(ys), np.ptp(xs)) + 1) // 4  # room for a template larger than the blob
        y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
        crop = m[y0:ys.max() + pad + 1, x0:xs.max() + pad + 1]
        found.append({"color": _NAMES[cls.flat[lid]], **_fit(crop, int(y0), int(x0)), "area": int(n)})
    return found


def _holds(a: dict, rel: str, b: dict) -> bool:
    d = {"to the left of": b["cx"] - a["cx"], "to the right of": a["cx"] - b["cx"], "above": b["cy"] - a["cy"],
         "below": a["cy"] - b["cy"]}[rel]
    return d >= max(a["r"], b["r"])


def _plural(n: int, color: str, shape: str) -> str:
    return f"{n} {color} {shape}{'' if n == 1 else 's'}"


def check(image, prompt: str) -> CheckResult:
    """Does the image show exactly the prompt's objects, with its relations? ValueError if the prompt is outside
    the grammar."""
    spec = parse_prompt(prompt)
    found = detect(image)
    want = spec.objects
    need, have = Counter(want), Counter((f["color"], f["shape"]) for f in found)
    reasons = []
    for cs in sorted(set(need) | set(have)):
        if need[cs] != have[cs]:
            what = "extra object" if not need[cs] else "wrong count"
            reasons.append(f"{what}: expected {_plural(need[cs], *cs)}, found {have[cs]}")
    if not reasons and spec.relations:
        # Every bijection prompt object → found object of the same colour+shape (at most 4! = 24).
        pools = defaultdict(list)
        for k, f in enumerate(found):
            pools[(f["color"], f["shape"])].append(k)
        classes = sorted(pools)
        slots = {cs: [i for i, w in enumerate(want) if w == cs] for cs in classes}
        best = None
        for perms in itertools.product(*(itertools.permutations(pools[cs]) for cs in classes)):
            assign = {}
            for cs, perm in zip(classes, perms):
                assign.update(zip(slots[cs], perm))
            bad = [(i, r, j) for i, r, j in spec.relations if not _holds(found[assign[i]], r, found[assign[j]])]
            if best is None or len(bad) < len(best):
                best = bad
            if not bad:
                break
        for i, r, j in best:
            reasons.append(f"relation not satisfied: {want[i][0]} {want[i][1]} {r} {want[j][0]} {want[j][1]}")
    return CheckResult(passed=not reasons, reasons=reasons, found=found)


def check_many(pairs) -> dict:
    """Summary over (image, prompt) pairs: see summarize."""
    return summarize((parse_prompt(prompt), check(image, prompt).passed) for image, prompt in pairs)


def summarize(scored) -> dict:
    """Summary over (spec, passed) pairs: overall pass fraction, and per form, split and relation (a prompt counts
    under each relation it uses, "none" if it has none)."""
    tot = [0, 0]
    groups: dict[str, dict[str, list[int]]] = {"per_form": defaultdict(lambda: [0, 0]),
                                               "per_split": defaultdict(lambda: [0, 0]),
                                               "per_relation": defaultdict(lambda: [0, 0])}
    for spec, passed in scored:
        ok = int(passed)
        keys = {"per_form": [spec.form_name], "per_split": [spec.split],
                "per_relation": sorted({r for _, r, _ in spec.relations}) or ["none"]}
        for g, ks in keys.items():
            for k in ks:
                groups[g][k][0] += ok
                groups[g][k][1] += 1
        tot[0] += ok
        tot[1] += 1

    def frac(p, n):
        return p / n if n else 0.0

    out = {"overall": frac(*tot), "n": tot[1]}
    for g, d in groups.items():
        out[g] = {k: {"pass": frac(p, n), "n": n} for k, (p, n) in sorted(d.items())}
    return out
