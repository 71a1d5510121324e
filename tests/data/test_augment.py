import io
import json
import logging
import random
from collections import Counter

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fluxtrain import config as C
from fluxtrain.data.augment import augment_caption, compose_caption
from fluxtrain.data.loader import build_loader
from fluxtrain.data.prompts import FLIP, heldout_prompts, layout, parse_prompt
from fluxtrain.data.synthetic import SyntheticShapes, render, write_shards
from fluxtrain.data.webdataset import build_webdataset_loader
from fluxtrain.eval.shapes_checker import check
from fluxtrain.train import data_counts


def clauses(caption: str) -> set[str]:
    """A caption's clauses, "B right of A" / "B below A" written as their twins, so order and direction don't matter."""
    out = set()
    for c in caption.split(" and "):
        for rel in ("to the right of", "below"):
            if f" {rel} " in c:
                a, b = c.split(f" {rel} ")
                c = f"{b} {FLIP[rel]} {a}"
        out.add(c)
    return out


@pytest.mark.parametrize("complex_frac, size", [(0.0, 64), (1.0, 64), (1.0, 128)])
def test_composed_captions_pass_the_checker_on_synthetic_scenes(complex_frac, size):
    src = SyntheticShapes(size, complex_frac, seed=5)
    n, passed, forms = 300, 0, Counter()
    for i in range(n):
        _, _, scene = src.spec_scene(i)
        cap = compose_caption(scene.to_json(), random.Random(i))
        spec = parse_prompt(cap)  # inside the grammar
        assert Counter(spec.objects) == Counter((o.color, o.shape) for o in scene.objects), cap  # each object once
        forms[spec.form_name] += 1
        passed += check(render(scene), cap).passed
    assert passed >= 0.99 * n
    # simple scenes (1-2 objects) come out as singles, counts and relations; complex ones stay complex
    assert set(forms) == ({"single", "count", "relation"} if complex_frac == 0 else {"complex"})


def obj(label, box, *attrs, **kw):
    return {"label": label, "attributes": list(attrs), "bbox": box, **kw}


@pytest.mark.parametrize("objects, expected", [
    # identical objects counted, the others related (the bus pair is never related: counts are not)
    ([obj("bus", [0, 0, 10, 10], "blue"), obj("bus", [50, 0, 60, 10], "blue"), obj("bicycle", [0, 50, 20, 70], "red"),
      obj("person", [100, 40, 120, 90])],
     {"two blue buses", "a red bicycle to the left of a person"}),
    # centres 5 px apart, radius 10: too close for any relation
    ([obj("cat", [0, 0, 20, 20], "orange"), obj("dog", [5, 5, 25, 25])], {"an orange cat", "a dog"}),
    # exactly one radius apart holds; the stronger axis wins (dy = 30 ≥ 15 beats dx = 10)
    ([obj("cup", [0, 0, 20, 20]), obj("plate", [20, 0, 40, 20])], {"a cup to the left of a plate"}),
    ([obj("lamp", [0, 40, 20, 70]), obj("table", [10, 0, 30, 30])], {"a table above a lamp"}),
    # tall boxes: vertical radius is the half-height (25), so 20 px of dy says nothing; dx = 30 ≥ 5 does
    ([obj("tree", [0, 0, 10, 50]), obj("pole", [30, 20, 40, 70])], {"a tree to the left of a pole"}),
    # plurals, numbers beyond the grammar, an object without a box is named, never related
    ([obj("person", [0, 0, 5, 5], plural="people")] * 2 + [obj("puppy", [0, 0, 5, 5])] * 5 + [{"label": "umbrella"}],
     {"two people", "five puppies", "an umbrella"}),
])
def test_generic_annotations(objects, expected):
    meta = {"objects": objects, "width": 200, "height": 100}
    for s in range(8):  # any clause order and relation direction
        cap = compose_caption(meta, random.Random(s))
        assert clauses(cap) == expected, cap


def test_uncomposable_metadata_keeps_the_caption():
    four = {"objects": [{"label": x} for x in ("a", "b", "c", "d")]}  # four clauses, no boxes to relate them
    for meta in (None, b"not json", b"[1, 2]", {"foo": 1}, {"objects": []}, {"objects": [{"label": " "}]},
                 {"objects": [obj("car", [10, 0, 0, 10])]}, four):
        assert augment_caption(meta, "own", 1.0, 0, 7) == ("own", False)


def test_augment_is_deterministic_and_follows_p():
    meta = json.dumps({"objects": [obj("cat", [0, 0, 10, 10]), obj("dog", [30, 0, 40, 10])]}).encode()
    for p, lo, hi in ((0.0, 0, 0), (0.3, 250, 350), (1.0, 1000, 1000)):
        got = [augment_caption(meta, "own", p, 1, sid) for sid in range(1000)]
        assert all(usable for _, usable in got)
        assert lo <= sum(c != "own" for c, _ in got) <= hi
    assert [augment_caption(meta, "own", 0.5, 1, s) for s in range(50)] == \
        [augment_caption(meta, "own", 0.5, 1, s) for s in range(50)]
    assert {augment_caption(meta, "own", 1.0, 1, s)[0] for s in range(50)} == \
        {"a cat to the left of a dog", "a dog to the right of a cat"}


def test_composed_captions_avoid_heldout_prompts():
    held = sorted(heldout_prompts())
    single = next(h for h in held if parse_prompt(h).form == 1)  # composes back to itself
    scene = layout(parse_prompt(single), 64, random.Random(0))
    assert compose_caption(scene.to_json(), random.Random(0)) == single
    assert augment_caption(scene.to_json(), "own", 1.0, 0, 0) == ("own", True)


def test_noisy_shards_are_corrected_through_the_webdataset_loader(tmp_path, caplog):
    # write_shards corrupts the .txt caption only; the .json scene is the image's true one
    write_shards(tmp_path, num=64, size=64, complex_frac=0.5, noise_frac=0.5, seed=3, per_shard=16)
    raw = [s for s in wds.WebDataset(str(tmp_path / "shard-{000000..000003}.tar"), shardshuffle=False)]
    noisy = [s for s in raw if json.loads(s["json"])["noisy"]]
    assert len(noisy) == 32
    assert sum(check(Image.open(io.BytesIO(s["png"])), s["txt"].decode()).passed for s in noisy) <= 1
    cfg = C.from_dict({"data": {"source": "webdataset", "path": str(tmp_path / "shard-*.tar"), "resolution": 64,
                                "shuffle_buffer": 0, "caption_augment": 1.0}, "train": {"batch_size": 8}})
    loader = build_webdataset_loader(cfg, 0, 1)
    batches = [next(loader) for _ in range(8)]  # one epoch
    loader.close()
    pairs = [(((b["pixels"][k] + 1) / 2).numpy(), c) for b in batches for k, c in enumerate(b["captions"])]
    assert len(pairs) == 64 and sum(check(x, c).passed for x, c in pairs) >= 63
    assert loader.no_scene == 0 and "scene metadata" not in caplog.text


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), seed, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_webdataset_counts_samples_without_metadata_and_resumes_exactly(tmp_path, caplog):
    meta = {"objects": [obj("cat", [0, 0, 8, 8]), obj("dog", [20, 0, 28, 8])], "width": 32, "height": 32}
    with wds.TarWriter(str(tmp_path / "shard-000000.tar"), encoder=False) as sink:
        for i in range(32):
            s = {"__key__": f"k{i:02d}", "png": _png(i), "txt": f"own {i}".encode()}
            if i % 4:  # every fourth sample has no metadata
                s["json"] = json.dumps(meta).encode()
            sink.write(s)
    cfg = C.from_dict({"data": {"source": "webdataset", "path": str(tmp_path / "shard-*.tar"), "resolution": 32,
                                "shuffle_buffer": 8, "caption_augment": 0.5, "seed": 2}, "train": {"batch_size": 4}})
    caplog.set_level(logging.WARNING, logger="fluxtrain")
    a = build_webdataset_loader(cfg, 0, 1)
    ref = [next(a) for _ in range(8)]  # one epoch
    assert a.no_scene == 8 and a.state_dict()["no_scene"] == 8
    assert data_counts(a, cfg) == {"data_skipped": 0, "captions_without_scene": 8}  # the metrics row's fields
    assert data_counts(a, C.from_dict({})) == {"data_skipped": 0}  # no augmentation, no column
    assert caplog.text.count("sample(s) so far without usable scene metadata") == 1  # logged at 1, 10, 100, …
    caps = {k: c for b in ref for k, c in zip(b["keys"], b["captions"])}
    bare = {k for k in caps if int(k[-2:]) % 4 == 0}
    assert all(caps[k].startswith("own") for k in bare)
    composed = [c for k, c in caps.items() if k not in bare and not c.startswith("own")]
    assert 4 <= len(composed) <= 20 and clauses(composed[0]) == {"a cat to the left of a dog"}
    a.close()
    b = build_webdataset_loader(cfg, 0, 1)
    head = [next(b) for _ in range(3)]
    state = json.loads(json.dumps(b.state_dict()))
    b.close()
    c = build_webdataset_loader(cfg, 0, 1)
    c.load_state_dict(state)
    tail = [next(c) for _ in range(5)]
    c.close()
    assert [x["captions"] for x in head + tail] == [x["captions"] for x in ref] and c.no_scene == 8


def test_synthetic_source_and_config():
    cfg = C.from_dict({"data": {"caption_augment": 1.0, "complex_frac": 1.0}, "train": {"batch_size": 4}})
    loader = build_loader(cfg, 0, 1)
    assert loader.source.caption_augment == 1.0
    plain, aug = SyntheticShapes(64, 1.0, seed=0), SyntheticShapes(64, 1.0, seed=0, caption_augment=1.0)
    items = [aug[i] for i in range(40)]
    assert [it["caption"] for it in items] == [aug[i]["caption"] for i in range(40)]  # a function of (seed, i)
    assert sum(it["caption"] != plain[i]["caption"] for i, it in enumerate(items)) >= 20
    assert sum(check(it["image"], it["caption"]).passed for it in items) >= 39
    assert all(it["scene"] == plain[i]["scene"] for i, it in enumerate(items))
    with pytest.raises(C.ConfigError, match=r"data.caption_augment must be in \[0, 1\] \(got 1.5\)"):
        C.from_dict({"data": {"caption_augment": 1.5}})
