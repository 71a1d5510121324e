"""bench/step_speed.py: each variant trains alone with its overrides, and its rate is read from its own log rows."""

import json
import subprocess
import sys
import tomllib

from tests.helpers import ROOT, env


def test_each_variant_trains_with_its_overrides_and_gets_its_own_rate(tmp_path):
    res = subprocess.run([sys.executable, "bench/step_speed.py", "--work", str(tmp_path), "--preset", "tiny",
                          "--num", "64", "--steps", "12", "--log-interval", "2", "--skip", "1", "--no-compile",
                          "--batch", "8", "--variants", "fp32=", "ac16=--parallel.autocast true --train.batch_size 16"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    table = json.loads((tmp_path / "step_speed.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["fp32", "ac16"]
    for name, autocast, batch in (("fp32", False, 8), ("ac16", True, 16)):
        cfg = tomllib.loads((tmp_path / "runs" / name / "config.toml").read_text())
        assert cfg["parallel"]["autocast"] is autocast and cfg["train"]["batch_size"] == batch
        metrics = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        logged = [m["samples_per_s"] for m in metrics if "event" not in m and m.get("samples_per_s")]
        assert rows[name]["batch"] == batch and rows[name]["rows"] == len(logged) - 1
        assert min(logged[1:]) <= rows[name]["samples_per_s"] <= max(logged[1:])
    assert rows["fp32"]["vs_first"] == 1.0
    assert rows["ac16"]["vs_first"] == rows["ac16"]["samples_per_s"] / rows["fp32"]["samples_per_s"]
    assert "| ac16 |" in res.stdout
