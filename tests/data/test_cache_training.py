"""Training from the cache equals training online on the same samples with the same noise (bf16 cache tolerance)."""

from tests.helpers import FAST, assert_close, fluxtrain, losses, torchrun


def test_cache_training_matches_online(tmp_path):
    res = fluxtrain(["cache", "--config", "configs/tiny.toml", "--out", str(tmp_path / "cache"), "--num", "40",
                     "--per-shard", "20"])
    assert res.returncode == 0, res.stderr[-3000:]
    common = ["-m", "fluxtrain", "train", "--config", "configs/tiny.toml", *FAST, "--data.shuffle_buffer", "0"]
    online = torchrun(2, [*common, "--train.output_dir", str(tmp_path / "online")])
    cached = torchrun(2, [*common, "--train.output_dir", str(tmp_path / "cached"), "--data.source", "cache",
                          "--data.path", str(tmp_path / "cache")])
    assert online.returncode == 0 and cached.returncode == 0, online.stderr[-2000:] + cached.stderr[-2000:]
    # 10 steps × 4 samples = the 40 cached samples, in the same order, with the same per-sample noise
    assert_close(losses(tmp_path / "cached"), losses(tmp_path / "online"), 2e-2, "cache vs online")
