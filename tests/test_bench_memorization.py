"""bench/memorization.py: paired flow losses of a model on two shard sets. The same shards on both sides give a gap
of exactly 0 (same batches, same draws); other scenes give one of their own."""

import json
import subprocess
import sys

from tests.helpers import ROOT, env, fluxtrain


def _shards(out, seed):
    res = fluxtrain(["data", "synth", "--out", str(out), "--num", "16", "--complex-frac", "0.5", "--seed", str(seed),
                     "--size", "32"])
    assert res.returncode == 0, res.stderr[-2000:]
    return str(out / "*.tar")


def _run(tmp_path, seen, fresh, name):
    out = tmp_path / f"{name}.json"
    res = subprocess.run([sys.executable, "bench/memorization.py", "--config", "configs/tiny.toml", "--seen", seen,
                          "--fresh", fresh, "--model.pretrained", "fluxtrain/assets/tiny-flux", "--train.device",
                          "cpu", "--data.resolution", "32", "--train.batch_size", "4", "--batches", "3",
                          "--out", str(out)], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_same_shards_give_no_gap_and_other_scenes_give_one(tmp_path):
    a, b = _shards(tmp_path / "a", 1), _shards(tmp_path / "b", 2)
    same = _run(tmp_path, a, a, "same")
    assert len(same["rows"]) == 3
    assert all(r["seen"] == r["fresh"] for r in same["rows"]) and same["summary"]["gap"] == 0.0
    other = _run(tmp_path, a, b, "other")
    assert [r["seen"] for r in other["rows"]] == [r["seen"] for r in same["rows"]]  # paired draws: reproducible
    assert any(r["seen"] != r["fresh"] for r in other["rows"])
    s = other["summary"]
    assert abs(s["gap"] - (s["fresh"] - s["seen"])) < 1e-9 and s["gap_se"] > 0
