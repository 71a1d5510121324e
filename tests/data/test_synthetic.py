from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fluxtrain.data.prompts import (BACKGROUND, COLORS, MIN_SIZE, Obj, Scene, canonical_key, format_spec, heldout_keys,
                                    heldout_prompts, parse_prompt)
from fluxtrain.data.synthetic import SyntheticShapes, render, write_shards


def _pixels(img: Image.Image) -> set:
    return set(map(tuple, np.asarray(img).reshape(-1, 3).tolist()))


def test_render_is_flat_and_geometric():
    scene = Scene([Obj("red", "square", 16.0, 16.0, 5.0), Obj("blue", "circle", 40.0, 16.0, 6.0),
                   Obj("orange", "triangle", 32.0, 44.0, 8.0)], 64, "", "complex", None)
    img = render(scene)
    a = np.asarray(img)
    assert img.size == (64, 64) and img.mode == "RGB"
    assert _pixels(img) == {BACKGROUND, COLORS["red"], COLORS["blue"], COLORS["orange"]}
    red = np.all(a == COLORS["red"], -1)
    ys, xs = np.nonzero(red)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (11, 20, 11, 20) and red.sum() == 100  # 10x10 square
    blue = np.all(a == COLORS["blue"], -1).sum()
    assert abs(blue - np.pi * 36) < 8
    tri = np.all(a == COLORS["orange"], -1)
    ys, xs = np.nonzero(tri)
    assert abs(tri.sum() - 2 * 8 * 8) < 10  # base 2r, height 2r
    top, bottom = tri[ys.min()].sum(), tri[ys.max()].sum()
    assert top <= 2 and bottom >= 14  # apex up


def test_synthetic_source_is_deterministic():
    a, b = SyntheticShapes(64, complex_frac=0.5, seed=3), SyntheticShapes(64, complex_frac=0.5, seed=3)
    assert len(a) >= 10**6
    x, y = a[17], b[17]
    assert x["caption"] == y["caption"] and x["scene"] == y["scene"]
    assert np.array_equal(np.asarray(x["image"]), np.asarray(y["image"]))
    assert x["scene"] != a[18]["scene"] and x["scene"] != SyntheticShapes(64, 0.5, seed=4)[17]["scene"]
    assert x["image"].size == (64, 64) and parse_prompt(x["caption"])
    assert np.array_equal(np.asarray(render(Scene.from_json(x["scene"]))), np.asarray(x["image"]))


def test_training_captions_never_hit_heldout():
    src = SyntheticShapes(64, complex_frac=0.5, seed=0)
    held, keys = heldout_prompts(), heldout_keys()
    caps = [src.spec_scene(i)[1] for i in range(5000)]
    assert not {format_spec(s) for s in caps} & held
    assert not any(canonical_key(s) in keys for s in caps)
    assert len({format_spec(s) for s in caps}) > 1000  # and they are varied


def _shards(tmp: Path, name: str, **kw) -> list[str]:
    return write_shards(tmp / name, **kw)


def test_write_shards_byte_identical_per_seed(tmp_path):
    kw = dict(num=30, size=64, complex_frac=0.5, noise_frac=0.2, per_shard=12)
    f1, f2 = _shards(tmp_path, "a", seed=5, **kw), _shards(tmp_path, "b", seed=5, **kw)
    assert [Path(f).name for f in f1] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [Path(f).read_bytes() for f in f1] == [Path(f).read_bytes() for f in f2]
    f3 = _shards(tmp_path, "c", seed=6, **kw)
    assert Path(f3[0]).read_bytes() != Path(f1[0]).read_bytes()


def _read(files) -> list[dict]:
    return list(wds.WebDataset(files, shardshuffle=False).decode("pil"))


def test_shards_read_back_with_webdataset(tmp_path):
    files = _shards(tmp_path, "s", num=25, size=48, complex_frac=0.5, seed=2, per_shard=10)
    samples = _read(files)
    assert [s["__key__"] for s in samples] == [f"0002-{i:08d}" for i in range(25)]
    src = SyntheticShapes(48, complex_frac=0.5, seed=2)
    for i, s in enumerate(samples):
        meta = s["json"]
        assert s["png"].size == (48, 48)
        assert s["txt"] == meta["caption_true"] == meta["caption"] and meta["noisy"] is False
        assert meta["form"] == parse_prompt(s["txt"]).form_name and "relation" in meta
        # the image is the scene, and sample i is the trainer source's item i
        assert np.array_equal(np.asarray(s["png"].convert("RGB")), np.asarray(render(Scene.from_json(meta))))
        assert meta["caption"] == src[i]["caption"]


def test_noise_frac_plants_exactly_that_fraction(tmp_path):
    samples = _read(_shards(tmp_path, "n", num=200, size=32, complex_frac=0.5, noise_frac=0.25, seed=1))
    noisy = [s for s in samples if s["json"]["noisy"]]
    assert len(noisy) == 50
    for s in samples:
        true = parse_prompt(s["json"]["caption_true"])
        said = parse_prompt(s["txt"])
        assert (canonical_key(said) != canonical_key(true)) == s["json"]["noisy"]
        assert s["txt"] not in heldout_prompts()


def test_prompts_file_is_rendered_in_turn(tmp_path):
    pf = tmp_path / "p.txt"
    pf.write_text("# eval\na red circle\n\none blue square to the left of a green triangle\nfour white squares\n")
    samples = _read(_shards(tmp_path, "p", num=7, size=64, prompts_file=str(pf), seed=0))
    want = ["a red circle", "a blue square to the left of a green triangle", "four white squares"]
    assert [s["txt"] for s in samples] == [want[i % 3] for i in range(7)]
    assert len(samples[3]["json"]["objects"]) == 1 and len(samples[2]["json"]["objects"]) == 4
    bad = tmp_path / "bad.txt"
    bad.write_text("a red hexagon\n")
    with pytest.raises(ValueError):
        write_shards(tmp_path / "x", 1, prompts_file=str(bad))


def test_min_size_lays_out_every_kind_of_scene():
    # MIN_SIZE is what the CLI and config allow: at it, complex scenes (up to five objects, 3 px apart) must still fit
    for seed in range(3):
        src = SyntheticShapes(MIN_SIZE, complex_frac=1.0, seed=seed)
        for i in range(300):
            assert src[i]["image"].size == (MIN_SIZE, MIN_SIZE)
    with pytest.raises(ValueError, match=f"≥ {MIN_SIZE}"):
        SyntheticShapes(MIN_SIZE - 1)
