"""bench/step_speed.py: each variant trains alone with its overrides, its rate is read from its own log rows, and a
variant that fails gets a row of its own while the next one still runs."""

import json
import subprocess
import sys
import tomllib

from tests.helpers import ROOT, env


def test_each_variant_trains_with_its_overrides_and_gets_its_own_rate(tmp_path):
    res = subprocess.run([sys.executable, "bench/step_speed.py", "--work", str(tmp_path), "--preset", "tiny",
                          "--num", "64", "--steps", "12", "--log-interval", "2", "--skip", "1", "--no-compile",
                          "--batch", "8", "--out", str(tmp_path / "new" / "speed.json"), "--variants", "b8=",
                          "bad=--optim.lr -1", "b16=--optim.lr 2e-3 --train.batch_size 16"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]  # one variant failed
    table = json.loads((tmp_path / "new" / "speed.json").read_text())
    rows = {r["variant"]: r for r in table["rows"]}
    assert list(rows) == ["b8", "bad", "b16"]
    assert "error" in rows["bad"] and rows["bad"]["vs_first"] is None and "| bad | failed" in res.stdout
    for name, lr, batch in (("b8", 1e-3, 8), ("b16", 2e-3, 16)):
        cfg = tomllib.loads((tmp_path / "runs" / name / "config.toml").read_text())
        assert cfg["optim"]["lr"] == lr and cfg["train"]["batch_size"] == batch
        metrics = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        logged = [m["samples_per_s"] for m in metrics if "event" not in m and m.get("samples_per_s")]
        assert rows[name]["batch"] == batch and rows[name]["rows"] == len(logged) - 1
        assert min(logged[1:]) <= rows[name]["samples_per_s"] <= max(logged[1:])
    assert rows["b8"]["vs_first"] == 1.0
    assert rows["b16"]["vs_first"] == rows["b16"]["samples_per_s"] / rows["b8"]["samples_per_s"]
    assert "| b16 |" in res.stdout
