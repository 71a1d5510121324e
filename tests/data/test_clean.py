"""`fluxtrain data clean`: planted label noise, broken images, bad aspect ratios and near-duplicates are dropped
(exact counts for the planted ones), clean samples survive, output shards keep the format, report.json tells why."""

import io
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from fluxtrain.data.clean import NearDuplicateIndex, clean, iter_samples, phash
from fluxtrain.data.prompts import layout, parse_prompt
from fluxtrain.data.synthetic import render, write_shards

ROOT = Path(__file__).resolve().parents[2]
N = 500


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, format="PNG")
    return b.getvalue()


def _jpeg(im: Image.Image, q: int = 95) -> bytes:
    b = io.BytesIO()
    im.save(b, format="JPEG", quality=q)
    return b.getvalue()


def _samples(d: Path) -> dict[str, dict]:
    return {s["__key__"]: s for s in iter_samples(sorted(str(p) for p in d.glob("shard-*.tar")))}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """N synthetic samples with 20% label noise, plus an extra shard of planted bad samples."""
    root = tmp_path_factory.mktemp("clean")
    write_shards(root / "in", N, size=64, complex_frac=0.3, noise_frac=0.2, seed=5, per_shard=200)
    orig = _samples(root / "in")
    clean_keys = [k for k, s in orig.items() if not json.loads(s["json"])["noisy"]]
    a, b, c = (orig[k] for k in clean_keys[:3])
    im_b = Image.open(io.BytesIO(b["png"])).convert("RGB")
    im_c = Image.open(io.BytesIO(c["png"])).convert("RGB")
    import random

    wide = layout(parse_prompt("a red circle"), 64, random.Random(0))
    wide_img = Image.new("RGB", (256, 64), (128, 128, 128))
    wide_img.paste(render(wide), (96, 0))
    planted = {
        # broken: truncated PNG, bytes that aren't an image
        "x-broken-1": {"png": a["png"][: len(a["png"]) // 2], "txt": a["txt"]},
        "x-broken-2": {"png": b"definitely not a png", "txt": b"a red circle"},
        "x-noimage": {"txt": b"a red circle"},
        "x-nocaption": {"png": _png(render(layout(parse_prompt("a blue square"), 64, random.Random(1))))},
        "x-wide": {"png": _png(wide_img), "txt": b"a red circle"},  # 4:1
        # near-duplicates of clean samples: exact copy, 1.5x bicubic resize, JPEG q95 re-encode
        "x-dup-exact": {"png": a["png"], "txt": a["txt"]},
        "x-dup-resized": {"png": _png(im_b.resize((96, 96), Image.BICUBIC)), "txt": b["txt"]},
        "x-dup-jpeg": {"jpg": _jpeg(im_c), "txt": c["txt"]},
        # a caption outside the grammar: kept (unchecked) unless CLIP scoring is asked for
        "x-free-text": {"png": _png(render(layout(parse_prompt("two green triangles"), 64, random.Random(2)))),
                        "txt": b"a picture of some green shapes"},
    }
    with wds.TarWriter(str(root / "in" / "shard-extra.tar"), encoder=False) as w:
        for k, s in planted.items():
            w.write({"__key__": k, **s})
    noisy = {k for k, s in orig.items() if json.loads(s["json"])["noisy"]}
    return root, orig, noisy, planted


def test_clean_drops_noise_and_planted(dataset, tmp_path):
    root, orig, noisy, planted = dataset
    out = tmp_path / "out"
    res = subprocess.run([sys.executable, "-m", "fluxtrain", "data", "clean", "--in", str(root / "in" / "shard-*.tar"),
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.strip().splitlines()) == 1 and "kept" in res.stdout
    rep = json.loads((out / "report.json").read_text())
    by, keys = rep["dropped_by_reason"], rep["dropped_keys"]
    assert rep["total"] == N + len(planted)
    assert sorted(keys["broken_image"]) == ["x-broken-1", "x-broken-2"] and by["broken_image"] == 2
    assert keys["duplicate"] == ["x-dup-exact", "x-dup-resized", "x-dup-jpeg"] and by["duplicate"] == 3
    assert keys["no_image"] == ["x-noimage"] and keys["no_caption"] == ["x-nocaption"]
    assert keys["aspect_ratio"] == ["x-wide"]
    mismatch = set(keys["caption_mismatch"])
    assert len(noisy) == 100
    assert len(mismatch & noisy) >= 0.95 * len(noisy), len(mismatch & noisy)
    dropped_all = {k for v in keys.values() for k in v}
    clean_dropped = (dropped_all & set(orig)) - noisy
    assert len(clean_dropped) < 0.02 * (N - len(noisy)), sorted(clean_dropped)
    assert rep["unchecked"] == 1 and rep["kept"] == rep["total"] - rep["dropped"]

    kept = _samples(out)
    assert len(kept) == rep["kept"] and "x-free-text" in kept
    k0 = next(k for k in kept if k in orig)
    assert kept[k0].keys() == orig[k0].keys()  # every member carried over ...
    assert all(kept[k0][e] == orig[k0][e] for e in ("png", "txt", "json"))  # ... byte for byte


def test_clip_hook_for_free_text_captions(dataset, tmp_path):
    from tests.eval.test_evaluate import make_tiny_clip

    root, *_ = dataset
    clip = make_tiny_clip(tmp_path / "clip")
    strict = clean(str(root / "in" / "shard-extra.tar"), tmp_path / "o1", clip_dir=clip, clip_min=1000.0,
                   verbose=False)
    assert strict["dropped_keys"]["clip_low"] == ["x-free-text"] and strict["checked_clip"] == 1
    lax = clean(str(root / "in" / "shard-extra.tar"), tmp_path / "o2", clip_dir=clip, clip_min=-1000.0,
                verbose=False)
    assert "clip_low" not in lax["dropped_keys"] and isinstance(lax["clip_score_mean"], float)


def test_damaged_shard_is_reported_not_fatal(dataset, tmp_path):
    root, *_ = dataset
    src = root / "in" / "shard-000000.tar"
    data = src.read_bytes()
    d = tmp_path / "in"
    d.mkdir()
    (d / "shard-a.tar").write_bytes(data[: len(data) // 2])  # ends mid-archive
    (d / "shard-b.tar").write_bytes(b"not a tar at all")
    rep = clean(str(d / "*.tar"), tmp_path / "out", verbose=False)
    assert len(rep["shard_errors"]) == 2 and 50 < rep["total"] < 200


def test_missing_input_is_an_error(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fluxtrain", "data", "clean", "--in", str(tmp_path / "no-*.tar"),
                          "--out", str(tmp_path / "o")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no shard files match" in res.stderr


def test_near_duplicate_index_tells_look_alikes_apart():
    """A purple square and a purple circle at the same spot share a 64-bit hash neighbourhood but aren't duplicates;
    an exact copy is."""
    from fluxtrain.data.prompts import Obj, Scene

    sq = render(Scene([Obj("purple", "square", 20.0, 40.0, 6.0)], 64, "", "single", None))
    ci = render(Scene([Obj("purple", "circle", 20.0, 40.0, 6.0)], 64, "", "single", None))
    assert bin(phash(sq) ^ phash(ci)).count("1") <= 4  # the hash alone would call them duplicates
    idx = NearDuplicateIndex()
    idx.add("sq", sq)
    assert idx.find(ci) is None and idx.find(sq.copy()) == "sq"
    bright = Image.fromarray(np.clip(np.asarray(sq, np.int16) + 6, 0, 255).astype(np.uint8))
    assert idx.find(bright) == "sq"


def test_tar_members_round_trip(tmp_path):
    p = tmp_path / "t.tar"
    with tarfile.open(p, "w") as tf:
        for name, data in (("a/k1.png", b"1"), ("a/k1.txt", b"x"), ("a/k2.seg.png", b"2"), ("a/k2.txt", b"y")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = list(iter_samples([str(p)]))
    assert [s["__key__"] for s in got] == ["a/k1", "a/k2"] and got[1]["seg.png"] == b"2"


def test_input_that_cannot_be_read_at_all_fails_and_names_the_shards(dataset, tmp_path, capsys):
    from fluxtrain.data.clean import main

    root, *_ = dataset
    data = (root / "in" / "shard-000000.tar").read_bytes()
    d = tmp_path / "in"
    d.mkdir()
    (d / "shard-a.tar").write_bytes(data[: len(data) // 2])
    (d / "shard-b.tar").write_bytes(b"not a tar at all")
    assert main(str(d / "*.tar"), str(tmp_path / "out")) == 0  # half a shard is still data
    assert "2 damaged shard(s): shard-a.tar, shard-b.tar" in capsys.readouterr().out
    (d / "shard-a.tar").write_bytes(b"junk")
    # everything damaged was "kept 0" with exit code 0 and an empty shard written: a clean set of nothing
    assert main(str(d / "*.tar"), str(tmp_path / "out2")) == 2
    out, err = capsys.readouterr()
    err = err.strip().splitlines()
    assert len(err) == 1 and "no sample could be read" in err[0] and "all 2 shard(s)" in err[0], err
    assert out == ""  # no "cleaned 0 samples" summary beside the error


def test_out_holding_data_is_refused_and_nothing_is_deleted(dataset, tmp_path, capsys):
    # --out = the input folder deleted the input shards before reading them
    from fluxtrain.data.clean import main

    root, *_ = dataset
    src = tmp_path / "src"
    shutil.copytree(root / "in", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    assert main(str(src / "*.tar"), str(src)) == 2
    assert "holds input shards: give another folder" in capsys.readouterr().err
    other = tmp_path / "other"  # another data set's folder: its shards are not an earlier clean's
    shutil.copytree(root / "in", other)
    assert main(str(src / "*.tar"), str(other)) == 2
    assert "shard-*.tar files that no earlier clean wrote" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before and len(list(other.iterdir())) == len(before)
    # an earlier clean's output is replaced, as before
    assert main(str(src / "*.tar"), str(tmp_path / "c")) == 0 and main(str(src / "*.tar"), str(tmp_path / "c")) == 0


@pytest.mark.parametrize("spec, said", [("{d}", "is a folder: give a glob of its shards, e.g. '{d}/*.tar'"),
                                        ("{d}/*.tar {d}/nothing-*.tar", "no shard files match '{d}/nothing-*.tar'")])
def test_a_folder_or_a_pattern_matching_nothing_is_one_line(dataset, tmp_path, capsys, spec, said):
    from fluxtrain.data.clean import main

    root, *_ = dataset
    d = str(root / "in")
    assert main(spec.format(d=d), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and said.format(d=d) in err[0], err


@pytest.mark.parametrize("cut_in", ["the first member", "a later member"])
def test_a_shard_cut_inside_a_sample_keeps_every_complete_sample_before_it(tmp_path, cut_in):
    # cut inside sample 5's first member, sample 4 (complete) was dropped too, and not counted
    write_shards(tmp_path / "d", 10, per_shard=10)
    shard = tmp_path / "d" / "shard-000000.tar"
    members = [m for m in tarfile.open(shard).getmembers() if m.isfile()]
    i = next(j for j, m in enumerate(members) if m.name.endswith("00000005.json" if cut_in == "the first member"
                                                                  else "00000005.txt"))
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:members[i].offset_data + 10])
    errors: list = []
    keys = [s["__key__"] for s in iter_samples([str(cut)], errors)]
    assert keys == [f"0000-{k:08d}" for k in range(5)], keys
    assert len(errors) == 1 and errors[0]["partial_key"] == "0000-00000005", errors
