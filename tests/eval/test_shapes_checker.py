import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from fluxtrain.data.prompts import Obj, Scene, canonical_key, corrupt_caption, format_spec, layout, sample_spec
from fluxtrain.data.synthetic import render
from fluxtrain.eval.shapes_checker import check, check_many, detect

N = 300  # prompts per validation set


def _cases(size: int, seed: int):
    rng = random.Random(seed)
    for _ in range(N):
        spec = sample_spec(rng, 0.5, exclude_heldout=False)
        yield rng, spec, render(layout(spec, size, rng))


def _degrade(img: Image.Image, rng: random.Random) -> Image.Image:
    a = np.asarray(img.filter(ImageFilter.GaussianBlur(0.7)), np.float32)
    a += np.random.default_rng(rng.randrange(2**32)).normal(0, 10, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("size", [64, 128])
def test_ground_truth_renders_pass(size):
    results = [(check(img, format_spec(spec)).passed, spec.split) for _, spec, img in _cases(size, size)]
    assert {s for _, s in results} == {"simple", "complex"} and sum(s == "complex" for _, s in results) > 100
    assert np.mean([p for p, _ in results]) >= 0.99


@pytest.mark.parametrize("size", [64, 128])
def test_blurred_noisy_renders_still_pass(size):
    rate = np.mean([check(_degrade(img, rng), format_spec(spec)).passed for rng, spec, img in _cases(size, size + 1)])
    assert rate >= 0.95


@pytest.mark.parametrize("size", [64, 128])
def test_other_prompts_fail(size):
    other = near = 0
    for rng, spec, img in _cases(size, size + 2):
        while True:  # a different random prompt of the grammar
            b = sample_spec(rng, 0.5, exclude_heldout=False)
            if canonical_key(b) != canonical_key(spec):
                break
        other += check(img, format_spec(b)).passed
        near += check(img, format_spec(corrupt_caption(spec, rng, exclude_heldout=False))).passed  # one change
    assert other / N <= 0.05 and near / N <= 0.05


def test_uniform_noise_fails():
    rng = random.Random(9)
    g = np.random.default_rng(0)
    passed = [check(Image.fromarray(g.integers(0, 256, (s, s, 3), dtype=np.uint8)),
                    format_spec(sample_spec(rng, 0.5, exclude_heldout=False))).passed
              for s in [64] * 60 + [128] * 40]
    assert np.mean(passed) <= 0.05


def _scene(*objs, size=64) -> Image.Image:
    return render(Scene([Obj(*o) for o in objs], size, "", "", None))


def test_shapes_colours_and_counts():
    img = _scene(("red", "circle", 12, 12, 7), ("blue", "square", 40, 14, 6), ("yellow", "triangle", 16, 46, 8),
                 ("yellow", "triangle", 46, 46, 6))
    found = sorted((f["color"], f["shape"]) for f in detect(img))
    assert found == [("blue", "square"), ("red", "circle"), ("yellow", "triangle"), ("yellow", "triangle")]
    assert check(img, "a red circle and a blue square and two yellow triangles").passed
    r = check(img, "a red circle and a blue square and a yellow triangle")
    assert not r.passed and any("yellow triangle" in x for x in r.reasons)
    r = check(img, "a red circle and two yellow triangles")
    assert not r.passed and any("extra" in x and "blue square" in x for x in r.reasons)
    assert not check(img, "a red square and a blue square and two yellow triangles").passed


def test_relation_rule_is_one_radius():
    # centres 12 apart: left-of holds with radius <= 12, not with a radius-7 partner when 6 apart
    img = _scene(("red", "circle", 20, 32, 5), ("blue", "square", 32, 32, 5))
    assert check(img, "a red circle to the left of a blue square").passed
    assert check(img, "a blue square to the right of a red circle").passed
    assert not check(img, "a red circle to the right of a blue square").passed
    assert not check(img, "a red circle above a blue square").passed  # same height: neither above nor below
    near = _scene(("red", "circle", 24, 32, 7), ("blue", "square", 29, 46, 5))  # dx 5 < r, dy 14 >= r
    assert not check(near, "a red circle to the left of a blue square").passed
    assert check(near, "a red circle above a blue square").passed
    r = check(near, "a red circle below a blue square")
    assert not r.passed and any(x.startswith("relation not satisfied") for x in r.reasons)


def test_lookalike_relation_uses_any_assignment():
    # two red circles: whichever the detector lists first, "one left of the other" holds
    img = _scene(("red", "circle", 48, 20, 6), ("red", "circle", 14, 22, 6), ("blue", "triangle", 30, 50, 6))
    assert check(img, "a red circle to the left of a red circle and a blue triangle").passed
    assert check(img, "a red circle to the right of a red circle and a blue triangle").passed
    assert not check(img, "a red circle above a red circle and a blue triangle").passed


def test_inputs_and_summary():
    img = _scene(("green", "square", 20, 20, 6), ("black", "circle", 44, 44, 7))
    arr = np.asarray(img)
    assert check(arr, "a green square and a black circle").passed
    assert check(arr.astype(np.float32) / 255, "a green square and a black circle").passed
    with pytest.raises(ValueError):
        check(img, "a green hexagon")
    pairs = [(img, "a green square and a black circle"), (img, "a green square above a black circle"),
             (img, "a green square to the left of a black circle"), (img, "two green squares"),
             (img, "a green square and a black circle and a red triangle")]
    out = check_many(pairs)
    assert out["n"] == 5 and out["overall"] == pytest.approx(3 / 5)
    assert out["per_form"]["relation"] == {"pass": 1.0, "n": 2} and out["per_form"]["count"]["pass"] == 0.0
    assert out["per_relation"]["above"]["n"] == 1 and out["per_relation"]["none"]["n"] == 3
    assert out["per_split"]["complex"] == {"pass": 0.0, "n": 1}
