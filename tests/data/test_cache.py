import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fluxtrain import config as C
from fluxtrain.data.cache import build_cache_loader, main
from fluxtrain.data.loader import build_loader
from fluxtrain.data.webdataset import decode_sample, read_shard, u8_to_pixels
from tests.data.test_webdataset import good, write_shard

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> Path:
    """A minimal encoders folder (tokenizers, tiny T5/CLIP, a random tiny VAE): no shipped assets needed."""
    from transformers import CLIPTokenizer, T5TokenizerFast

    from fluxtrain.models import tiny

    out = tmp_path_factory.mktemp("enc")
    tiny._clip_tokenizer(out / "tokenizer")
    tiny._t5_tokenizer(out / "tokenizer_2")
    tiny._text_encoders(out, len(CLIPTokenizer.from_pretrained(out / "tokenizer")),
                        len(T5TokenizerFast.from_pretrained(out / "tokenizer_2")))
    torch.manual_seed(0)
    vae = tiny.new_vae()
    vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    vae.save_pretrained(out / "vae")
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("src")
    words = ["red circle", "blue square", "two green triangles", "a yellow circle above a black square"]
    for s, n in enumerate([5, 4, 6]):
        samples = [good(f"s{s}-{i}", seed=s * 10 + i) for i in range(n)]
        for i, x in enumerate(samples):
            x["txt"] = f"{words[(s + i) % 4]} {s} {i}".encode()
        if s == 1:
            samples.insert(2, {"__key__": "s1-junk", "png": b"junk", "txt": b"x"})
        write_shard(d / f"shard-{s:06d}.tar", samples)
    return d


def overrides(src: Path, enc: Path) -> list[str]:
    return ["--data.source", "webdataset", "--data.path", str(src / "shard-*.tar"), "--data.resolution", "32",
            "--model.encoders", str(enc), "--model.max_text_tokens", "16", "--train.device", "cpu"]


def cache_cfg(out: Path, enc: Path, bs: int, shuffle: int = 0) -> C.Config:
    return C.from_dict({"data": {"source": "cache", "path": str(out), "resolution": 32, "shuffle_buffer": shuffle},
                        "model": {"encoders": str(enc), "max_text_tokens": 16}, "train": {"batch_size": bs}})


@pytest.fixture(scope="module")
def cache(tmp_path_factory, source, encoders) -> Path:
    out = tmp_path_factory.mktemp("cache")
    assert main(["--out", str(out), "--batch-size", "3", *overrides(source, encoders)]) == 0
    return out


def test_manifest(cache):
    m = json.loads((cache / "manifest.json").read_text())
    assert m["count"] == 15 and m["skipped"] == {"decode_error": 1} and m["resolution"] == 32
    assert [s["count"] for s in m["shards"]] == [5, 4, 6]
    assert m["shapes"] == {"latent_mean": [16, 8, 8], "latent_std": [16, 8, 8], "seq": [16, 64], "pooled": [64]}
    with safe_open(str(cache / "shard-000001.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())


def test_round_trip_equals_the_encoders(cache, source, encoders):
    from fluxtrain.train import Encoders

    # the source samples in cache order: listed shards, tar order, bad ones skipped
    expected = []
    for url in sorted(source.glob("shard-*.tar")):
        for ev in read_shard(str(url)):
            if ev[0] == "sample":
                r = decode_sample(ev[2], [(32, 32)])
                if r[0] == "ok":
                    expected.append((r[2], r[3]))
    assert len(expected) == 15
    cfg = cache_cfg(cache, encoders, bs=3)
    enc = Encoders(cfg, torch.device("cpu"))
    loaders = [build_loader(cfg, r, 2) for r in range(2)]
    seen = []
    for _ in range(3):  # 3 global batches of 6 = 18 positions: one epoch (15) and 3 of the next
        for r, data in enumerate(loaders):
            b = next(data)
            assert b["latent_mean"].shape == (3, 16, 8, 8) and b["seq"].shape == (3, 16, 64)
            assert b["pooled"].shape == (3, 64) and b["indices"].dtype == torch.int64
            assert all(b[k].dtype == torch.bfloat16 for k in ("latent_mean", "latent_std", "seq", "pooled"))
            idx = b["cache_index"].tolist()
            seen += b["indices"].tolist()
            arrays = [expected[i][0] for i in idx]
            caps = [expected[i][1] for i in idx]
            assert b["captions"] == caps
            mean, std = enc.vae.moments(u8_to_pixels(torch.from_numpy(np.stack(arrays))))
            seq, pooled = enc.text(caps)
            for got, want in ((b["latent_mean"], mean), (b["latent_std"], std), (b["seq"], seq),
                              (b["pooled"], pooled)):
                torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=1e-2)
    assert sorted(seen) == list(range(18))
    e_seq, e_pooled = loaders[0].empty_prompt()
    w_seq, w_pooled = enc.text([""])
    torch.testing.assert_close(e_seq.float(), w_seq, rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(e_pooled.float(), w_pooled, rtol=1.6e-2, atol=1e-2)


def test_global_batch_is_independent_of_world_size_and_resumes(cache, encoders):
    one = build_cache_loader(cache_cfg(cache, encoders, bs=4, shuffle=100), 0, 1)
    two = [build_cache_loader(cache_cfg(cache, encoders, bs=2, shuffle=100), r, 2) for r in range(2)]
    for _ in range(5):
        whole = next(one)
        halves = [next(x) for x in two]
        assert whole["cache_index"].tolist() == halves[0]["cache_index"].tolist() + halves[1]["cache_index"].tolist()
        assert torch.equal(whole["seq"], torch.cat([h["seq"] for h in halves]))
    assert sorted(set(one.entry(g) for g in range(15))) == list(range(15))  # a permutation per epoch
    state = json.loads(json.dumps(one.state_dict()))
    again = build_cache_loader(cache_cfg(cache, encoders, bs=4, shuffle=100), 0, 1)
    again.load_state_dict(state)
    nxt = next(one)
    assert torch.equal(next(again)["latent_mean"], nxt["latent_mean"])


def test_whole_shard_reads_equal_sliced_reads(cache, encoders, monkeypatch):
    """Small shards are read whole and indexed, large ones sliced per sample: the batches must not differ."""
    from fluxtrain.data import cache as cache_mod

    whole = build_cache_loader(cache_cfg(cache, encoders, bs=5, shuffle=100), 0, 1)
    assert all(w is not None for _, _, w in [whole._open(j) for j in range(len(whole.files))])  # opened now
    monkeypatch.setattr(cache_mod, "WHOLE_SHARD_BYTES", 0)
    sliced = build_cache_loader(cache_cfg(cache, encoders, bs=5, shuffle=100), 0, 1)
    assert all(w is None for _, _, w in [sliced._open(j) for j in range(len(sliced.files))])
    for _ in range(4):  # crosses shards and an epoch boundary
        a, b = next(whole), next(sliced)
        assert a["captions"] == b["captions"] and torch.equal(a["cache_index"], b["cache_index"])
        for k in ("latent_mean", "latent_std", "seq", "pooled"):
            assert torch.equal(a[k], b[k])


def test_rerun_makes_only_missing_shards(cache, source, encoders, tmp_path):
    import shutil

    out = tmp_path / "c"
    shutil.copytree(cache, out)
    (out / "shard-000001.safetensors").unlink()
    (out / "manifest.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert main(["--out", str(out), *overrides(source, encoders)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert before.items() <= after.items() and "shard-000001.safetensors" in after
    assert json.loads((out / "manifest.json").read_text())["count"] == 15
    with pytest.raises(C.ConfigError, match="resolution"):
        main(["--out", str(out), *overrides(source, encoders), "--data.resolution", "64"])
    # shards of other input (another data.path) were reused: the cache lacked the new input's samples, exit 0
    other = tmp_path / "other"
    shutil.copytree(source, other)
    (other / "shard-000000.tar").rename(other / "shard-000009.tar")
    with pytest.raises(C.ConfigError, match=r"shard-000000.safetensors was made with source = .*shard-000000.tar "
                                            r"\(now .*other/shard-000001.tar\)"):
        main(["--out", str(out), *overrides(other, encoders)])
    # a damaged shard was a SafetensorError traceback
    shard = out / "shard-000002.safetensors"
    shard.write_bytes(shard.read_bytes()[:5])
    with pytest.raises(C.ConfigError, match="shard-000002.safetensors is damaged .*: delete it and rerun"):
        main(["--out", str(out), *overrides(source, encoders)])
    # a folder as data.path was a warning per sample, then "no usable sample"
    with pytest.raises(C.ConfigError, match=f"{source} is a folder: give a glob of its shards"):
        main(["--out", str(tmp_path / "c2"), *overrides(source, encoders), "--data.path", str(source)])


def test_loader_refuses_a_mismatched_cache(cache, encoders):
    bad = C.from_dict({"data": {"source": "cache", "path": str(cache), "resolution": 32},
                       "model": {"encoders": str(encoders), "max_text_tokens": 32}})
    with pytest.raises(C.ConfigError, match="text tokens"):
        build_cache_loader(bad, 0, 1)


def test_synthetic_source_on_two_ranks_matches_one(tmp_path, encoders):
    pytest.importorskip("fluxtrain.data.synthetic")
    args = ["--data.source", "synthetic", "--num-samples", "7", "--per-shard", "3", "--data.resolution", "32",
            "--model.encoders", str(encoders), "--model.max_text_tokens", "16", "--train.device", "cpu"]
    assert main(["--out", str(tmp_path / "one"), *args]) == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "fluxtrain", "cache", "--out", str(tmp_path / "two"), *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=85)
    assert r.returncode == 0, r.stderr[-3000:]
    m1 = json.loads((tmp_path / "one" / "manifest.json").read_text())
    m2 = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m1["count"] == m2["count"] == 7 and m1["shards"] == m2["shards"]
    for s in m1["shards"]:
        with safe_open(str(tmp_path / "one" / s["file"]), "pt") as a, \
                safe_open(str(tmp_path / "two" / s["file"]), "pt") as b:
            for k in a.keys():  # other thread counts: fp32 sums in another order, so bf16 tolerance
                torch.testing.assert_close(a.get_tensor(k).float(), b.get_tensor(k).float(), rtol=1.6e-2, atol=1e-2)
            assert a.metadata()["captions"] == b.metadata()["captions"]


def test_an_input_shard_rewritten_since_is_cached_again(source, encoders, tmp_path):
    # the rerun kept the cache shard of the input shard's earlier contents (a copy completed since: samples missing)
    import shutil

    src = tmp_path / "src"
    shutil.copytree(source, src)
    out = tmp_path / "c"
    assert main(["--out", str(out), *overrides(src, encoders)]) == 0
    assert json.loads((out / "manifest.json").read_text())["count"] == 15
    shard = src / "shard-000000.tar"
    write_shard(shard, [good(f"s0-{i}", seed=i) for i in range(7)])  # 7 samples where there were 5
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert main(["--out", str(out), *overrides(src, encoders)]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert json.loads((out / "manifest.json").read_text())["count"] == 17
    assert [n for n in after if after[n] != before[n]] == ["shard-000000.safetensors"]
