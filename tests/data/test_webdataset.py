import contextlib
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from fluxtrain import config as C
from fluxtrain.data.loader import build_loader
from fluxtrain.data.webdataset import (EPOCH_SHIFT, SHARD_SHIFT, DataError, build_webdataset_loader,
                                       resolve_shards)


def png(h: int, w: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3, dtype=np.uint8)
    arr[: h // 2, : w // 3] = rng.integers(0, 256, 3, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def good(key: str, h: int = 32, w: int = 32, seed: int = 0) -> dict:
    return {"__key__": key, "png": png(h, w, seed), "txt": f"caption {key}".encode()}


def write_shard(path: Path, samples: list[dict], truncate_last: bool = False) -> Path:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for s in samples:
            sink.write(s)
    if truncate_last:  # cut the archive in the middle of the last sample's image
        data = path.read_bytes()
        last = samples[-1]["png"]
        at = data.rindex(last[:64]) + len(last) // 2
        path.write_bytes(data[:at])
    return path


def make_shards(d: Path, n_shards: int, per: int, h: int = 32, w: int = 32) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return [write_shard(d / f"shard-{s:06d}.tar", [good(f"s{s}-{i:03d}", h, w, seed=s * 1000 + i) for i in range(per)])
            for s in range(n_shards)]


def cfg_for(path: str, bs: int = 4, res: int = 32, workers: int = 0, shuffle: int = 0, **data) -> C.Config:
    return C.from_dict({"data": {"source": "webdataset", "path": path, "resolution": res, "num_workers": workers,
                                 "shuffle_buffer": shuffle, **data},
                        "train": {"batch_size": bs}})


def split_id(i: int) -> tuple[int, int, int]:
    return i >> EPOCH_SHIFT, (i >> SHARD_SHIFT) & ((1 << (EPOCH_SHIFT - SHARD_SHIFT)) - 1), i & ((1 << SHARD_SHIFT) - 1)


def take(loader, n: int) -> list[dict]:
    out = [next(loader) for _ in range(n)]
    loader.close()
    return out


def ids_of(batches) -> list[int]:
    return [i for b in batches for i in b["indices"].tolist()]


@pytest.fixture(scope="module")
def shards8(tmp_path_factory):
    d = tmp_path_factory.mktemp("wds8")
    make_shards(d, 8, 8)
    return d


def test_two_ranks_two_workers_read_an_epoch_exactly_once(shards8):
    cfg = cfg_for(str(shards8 / "shard-*.tar"), workers=2, shuffle=10)
    per_rank = [take(build_webdataset_loader(cfg, r, 2), 8 + 4) for r in range(2)]
    first = [ids_of(b[:8]) for b in per_rank]  # 64 samples / (2 ranks · 4 per batch) = 8 batches per rank
    everything = ids_of(per_rank[0]) + ids_of(per_rank[1])
    assert len(everything) == len(set(everything))  # ids are unique across epochs too
    epoch0 = [split_id(i) for i in first[0] + first[1]]
    assert {e for e, _, _ in epoch0} == {0}
    assert sorted((s, n) for _, s, n in epoch0) == [(s, n) for s in range(8) for n in range(8)]
    assert not set(first[0]) & set(first[1])
    later = [split_id(i)[0] for b in per_rank for i in ids_of(b[8:])]
    assert set(later) == {1}
    for b in per_rank[0]:
        assert b["pixels"].shape == (4, 3, 32, 32) and b["pixels"].dtype == torch.float32
        assert -1.0 <= b["pixels"].min() and b["pixels"].max() <= 1.0
        assert b["indices"].dtype == torch.int64 and len(b["captions"]) == 4
    # a caption belongs to its image's key
    b = per_rank[1][0]
    assert all(c == "caption " + k.split("/")[1] for c, k in zip(b["captions"], b["keys"]))


def test_fewer_shards_than_slots_split_by_sample(tmp_path):
    make_shards(tmp_path, 3, 8)  # 3 shards < 2 ranks × 2 workers: samples split modulo 4
    cfg = cfg_for(str(tmp_path / "shard-{000000..000002}.tar"), bs=2, workers=2, shuffle=4)
    got = [ids_of(take(build_webdataset_loader(cfg, r, 2), 6)) for r in range(2)]
    allids = got[0] + got[1]
    assert len(set(allids)) == 24
    assert sorted(split_id(i) for i in allids) == [(0, s, n) for s in range(3) for n in range(8)]


def test_resume_mid_epoch_continues_exactly(shards8):
    cfg = cfg_for(str(shards8 / "shard-*.tar"), workers=2, shuffle=10)
    seen, reference = [], None
    for r in range(2):
        a = build_webdataset_loader(cfg, r, 2)
        head = take(a, 3)  # odd: the next batch is the second worker's
        state = json.loads(json.dumps(a.state_dict()))
        b = build_webdataset_loader(cfg, r, 2)
        b.load_state_dict(state)
        tail = take(b, 5)
        seen += ids_of(head) + ids_of(tail)
        if r == 0:
            reference = take(build_webdataset_loader(cfg, r, 2), 8)
            assert ids_of(reference) == ids_of(head) + ids_of(tail)
            for x, y in zip(reference[3:], tail):
                assert torch.equal(x["pixels"], y["pixels"]) and x["captions"] == y["captions"]
    assert len(seen) == len(set(seen)) == 64
    assert sorted(split_id(i) for i in seen) == [(0, s, n) for s in range(8) for n in range(8)]


def test_resume_without_workers_and_on_another_world_size(shards8):
    cfg = cfg_for(str(shards8 / "shard-*.tar"), shuffle=5)
    a = build_webdataset_loader(cfg, 0, 1)
    head = take(a, 5)
    state = a.state_dict()
    b = build_webdataset_loader(cfg, 0, 1)
    b.load_state_dict(state)
    tail = take(b, 11)
    ids = ids_of(head) + ids_of(tail)
    assert len(ids) == len(set(ids)) == 64 and {split_id(i)[0] for i in ids} == {0}
    # the trainer passes only {pos, skipped, epoch} when the world size changed: restart at the saved epoch
    c = build_webdataset_loader(cfg, 1, 2)
    c.load_state_dict({"skipped": 3, "epoch": 1})
    first = take(c, 1)[0]
    assert c.skipped == 3 and {split_id(i)[0] for i in first["indices"].tolist()} == {1}


@pytest.fixture(scope="module")
def corrupt(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt")

    def shard(s, bad=None, pos=4, truncate=False):
        samples = [good(f"s{s}-{i:03d}", seed=s * 100 + i) for i in range(8)]
        if bad is not None:
            samples.insert(pos, bad)
        if truncate:
            samples.append(good(f"s{s}-cut", seed=1))
        return write_shard(d / f"shard-{s:06d}.tar", samples, truncate_last=truncate)

    shard(0, {"__key__": "s0-garbage", "png": b"\x89PNG not really an image", "txt": b"a red circle"})
    shard(1, {"__key__": "s1-empty", "png": png(32, 32, 7), "txt": b"   "})
    shard(2, truncate=True)
    shard(3, good("s3-small", 16, 24, seed=3))
    shard(4, {"__key__": "s4-nocaption", "png": png(32, 32, 8)}, pos=0)
    for s in range(5, 8):
        shard(s)
    return d


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_are_skipped_and_counted(corrupt, workers):
    cfg = cfg_for(str(corrupt / "shard-*.tar"), workers=workers)
    ranks = [build_webdataset_loader(cfg, r, 2) for r in range(2)]
    # 8 shards × 8 good samples: each rank×worker slot has a multiple of the batch size per epoch
    per_rank = [take(x, 8 + 3) for x in ranks]  # and every rank keeps going into the next epoch
    epoch0 = [split_id(i) for b in per_rank for i in ids_of(b[:8])]
    assert {e for e, _, _ in epoch0} == {0} and len(epoch0) == 64 and len(set(epoch0)) == 64
    keys = {k for b in per_rank for x in b[:8] for k in x["keys"]}
    assert not any("garbage" in k or "empty" in k or "cut" in k or "small" in k or "nocaption" in k for k in keys)
    # counts after exactly epoch 0 (bad events never trail a slot's last good sample here)
    ranks = [build_webdataset_loader(cfg, r, 2) for r in range(2)]
    for x in ranks:
        take(x, 8)
    total: dict[str, int] = {}
    for x in ranks:
        for k, v in x.skipped_by_reason.items():
            total[k] = total.get(k, 0) + v
    assert total == {"decode_error": 1, "no_caption": 2, "truncated": 1, "too_small": 1}
    assert sum(x.skipped for x in ranks) == 5


@contextlib.contextmanager
def logged():
    """The fluxtrain log records emitted inside the block."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fluxtrain").addHandler(handler)
    try:
        yield records
    finally:
        logging.getLogger("fluxtrain").removeHandler(handler)


def test_skips_are_logged_with_the_shard(tmp_path):
    make_shards(tmp_path, 2, 4)
    (tmp_path / "list.txt").write_text("shard-000000.tar\nmissing.tar\n# comment\n\nshard-000001.tar\n")
    cfg = cfg_for("@" + str(tmp_path / "list.txt"), bs=2)
    with logged() as records:
        x = build_webdataset_loader(cfg, 0, 1)
        take(x, 9)  # more than one epoch (8 samples): the unreadable shard came up at least once
    assert x.skipped_by_reason.get("unreadable", 0) >= 1
    assert any("unreadable" in r.getMessage() and "missing.tar" in r.getMessage() for r in records)


@pytest.mark.parametrize("workers", [0, 1])
def test_too_much_bad_data_is_one_line_error(tmp_path, workers):
    samples = [{"__key__": f"bad{i:03d}", "png": b"junk", "txt": b"x"} for i in range(30)]
    samples += [good(f"ok{i}") for i in range(2)]
    write_shard(tmp_path / "junk-000.tar", samples)
    cfg = cfg_for(str(tmp_path / "junk-000.tar"), bs=2, workers=workers, max_skip_frac=0.5)
    x = build_webdataset_loader(cfg, 0, 1, skip_window=20)
    with pytest.raises(DataError) as err:
        take(x, 20)
    msg = str(err.value)
    assert "\n" not in msg and "junk-000.tar" in msg and "max_skip_frac" in msg


def test_no_usable_shard_does_not_hang(tmp_path):
    for i in range(2):
        (tmp_path / f"bad-{i}.tar").write_bytes(b"not a tar at all" * 10)
    cfg = cfg_for(str(tmp_path / "bad-*.tar"), bs=2, workers=1)
    with pytest.raises(DataError, match="no usable sample.*bad-"):
        take(build_webdataset_loader(cfg, 0, 1), 1)


def test_buckets_give_one_shape_per_batch_and_resume(tmp_path):
    sizes = [(32, 32), (32, 64), (64, 32), (40, 72), (70, 36)]  # (h, w)
    for s in range(4):
        samples = [good(f"s{s}-{i:03d}-{h}x{w}", h, w, seed=s * 50 + i)
                   for i, (h, w) in enumerate(sizes[(s + j) % len(sizes)] for j in range(10))]
        write_shard(tmp_path / f"shard-{s:06d}.tar", samples)
    buckets = [[32, 32], [32, 64], [64, 32]]
    cfg = cfg_for(str(tmp_path / "shard-*.tar"), bs=3, workers=2, shuffle=6, buckets=buckets)
    ref = take(build_webdataset_loader(cfg, 0, 1), 16)
    shapes = {tuple(b["pixels"].shape[2:]) for b in ref}
    assert shapes <= {(32, 32), (32, 64), (64, 32)} and len(shapes) == 3
    for b in ref:
        for k in b["keys"]:
            h, w = map(int, k.rsplit("-", 1)[1].split("x"))
            want = (32, 32) if h == w else (32, 64) if w > h else (64, 32)
            assert tuple(b["pixels"].shape[2:]) == want
    a = build_webdataset_loader(cfg, 0, 1)
    take(a, 7)
    state = a.state_dict()
    for w in state["workers"]:
        assert len(w["pending"]) <= len(buckets) * (3 - 1)
    assert any(w["pending"] for w in state["workers"])
    b = build_webdataset_loader(cfg, 0, 1)
    b.load_state_dict(json.loads(json.dumps(state)))
    tail = take(b, 9)
    assert [x["keys"] for x in tail] == [x["keys"] for x in ref[7:]]
    assert all(torch.equal(x["pixels"], y["pixels"]) for x, y in zip(tail, ref[7:]))


def test_bad_bucket_refused(shards8):
    with pytest.raises(C.ConfigError, match="multiples of 16"):
        build_webdataset_loader(cfg_for(str(shards8 / "shard-*.tar"), buckets=[[30, 32]]), 0, 1)


def test_shard_lists(shards8, tmp_path):
    glob = resolve_shards(str(shards8 / "shard-*.tar"))
    brace = resolve_shards(str(shards8 / "shard-{000000..000007}.tar"))
    (tmp_path / "list.txt").write_text("\n".join(glob[:4]) + "\n" + str(shards8 / "shard-{000004..000007}.tar") + "\n")
    listed = resolve_shards("@" + str(tmp_path / "list.txt"))
    assert glob == brace == listed and len(glob) == 8
    with pytest.raises(C.ConfigError, match="matches no files"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))
    with pytest.raises(C.ConfigError, match="none of its"):
        resolve_shards(str(tmp_path / "gone-{0..2}.tar"))


def test_pipe_refused_in_list_file_but_accepted_from_config(shards8, tmp_path):
    lst = tmp_path / "urls.txt"
    lst.write_text(f"{shards8}/shard-000000.tar\npipe:cat {shards8}/shard-000001.tar\n")
    with pytest.raises(C.ConfigError) as err:
        resolve_shards("@" + str(lst))
    assert "\n" not in str(err.value) and "pipe:" in str(err.value) and "urls.txt:2" in str(err.value)
    cfg = cfg_for(f"pipe:cat {shards8}/shard-00000{{0..1}}.tar", bs=4)
    ids = ids_of(take(build_webdataset_loader(cfg, 0, 1), 4))
    assert sorted(split_id(i) for i in ids) == [(0, s, n) for s in range(2) for n in range(8)]


def test_trainer_interface(shards8):
    data = build_loader(cfg_for(str(shards8 / "shard-*.tar"), bs=2, shuffle=3), 0, 1)
    batch = next(data)
    assert set(batch) >= {"pixels", "captions", "indices"} and batch["pixels"].shape == (2, 3, 32, 32)
    assert isinstance(data.skipped, int) and data.skipped_by_reason == {}
    json.dumps(data.state_dict())
    data.close()


def test_an_empty_tar_is_counted_and_logged(tmp_path):
    # a valid tar with no files was skipped without a word: data_skipped stayed 0
    write_shard(tmp_path / "a-000.tar", [good(f"ok{i}") for i in range(4)])
    write_shard(tmp_path / "a-001.tar", [])
    cfg = cfg_for(str(tmp_path / "a-*.tar"), bs=2)
    with logged() as records:
        x = build_webdataset_loader(cfg, 0, 1)
        take(x, 2)  # one epoch: both shards read
    assert x.skipped_by_reason.get("empty") == 1, x.skipped_by_reason
    assert any("empty" in r.getMessage() and "a-001.tar" in r.getMessage() for r in records)


def test_one_rank_without_data_stops_every_rank_at_once(tmp_path):
    # one sample, two ranks: rank 1's slot is empty. It raised, and rank 0 waited in its all-gather, rank 1 in the
    # closing barrier, for parallel.nccl_timeout_s (10 minutes), ending in a gloo traceback that blamed rank 0
    from fluxtrain.data.synthetic import write_shards
    from tests.helpers import FAST, fluxtrain

    write_shards(tmp_path / "d", 1)
    res = fluxtrain(["train", "--config", "configs/tiny.toml", "--nproc-per-node", "2", *FAST, "--train.steps", "3",
                     "--parallel.nccl_timeout_s", "300", "--data.source", "webdataset", "--data.path",
                     str(tmp_path / "d" / "*.tar"), "--train.output_dir", str(tmp_path / "run")], timeout=150)
    errors = [line for line in res.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert res.returncode == 2, res.stderr[-3000:]
    assert [e for e in errors if e.startswith("fluxtrain: error: ")] == [
        "fluxtrain: error: rank 1 worker 0: no usable sample in epoch 0 of shard(s) shard-000000.tar"], errors
    assert not any("Traceback" in e or "[rank0]" in e for e in errors), errors


def test_the_metrics_count_every_ranks_skipped_samples(tmp_path):
    # data_skipped was rank 0's count alone: a bad sample in another rank's shard never showed in metrics.jsonl
    from tests.helpers import FAST, fluxtrain, metrics

    d = tmp_path / "d"
    d.mkdir()
    for s, n_bad in enumerate((3, 2)):  # each rank reads one shard, its bad samples first
        bad = [{"__key__": f"s{s}-bad{i}", "png": b"\x89PNG not really", "txt": b"a red circle"} for i in range(n_bad)]
        write_shard(d / f"shard-{s:06d}.tar", bad + [good(f"s{s}-{i}", 64, 64, seed=i) for i in range(8)])
    res = fluxtrain(["train", "--config", "configs/tiny.toml", "--nproc-per-node", "2", *FAST, "--train.steps", "3",
                     "--data.source", "webdataset", "--data.path", str(d / "*.tar"), "--data.shuffle_buffer", "0",
                     "--train.output_dir", str(tmp_path / "run")], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [r for r in metrics(tmp_path / "run") if "data_skipped" in r]
    assert rows[-1]["data_skipped"] == 5, rows
