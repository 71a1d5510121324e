"""The run directory contract (DESIGN.md) of a real tiny run: config, metrics fields, TensorBoard, logs, samples."""

import tomllib

from tests.helpers import FAST, fluxtrain, metrics

FIELDS = {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "tflops_per_gpu", "mfu", "mem_gib",
          "mem_peak_gib", "mem_reserved_gib", "host_rss_gib", "data_wait_s", "data_skipped"}


def test_run_directory(tmp_path):
    res = fluxtrain(["train", "--config", "configs/tiny.toml", *FAST, "--train.steps", "3", "--log.trackers",
                     '["tensorboard"]', "--train.output_dir", str(tmp_path), "--eval.adherence_prompts", "2"])
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = tomllib.loads((tmp_path / "config.toml").read_text())
    assert cfg["train"]["steps"] == 3
    rows = [r for r in metrics(tmp_path) if "event" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert FIELDS <= rows[-1].keys()
    assert rows[-1]["mfu"] is None and rows[-1]["mem_gib"] is None  # GPU-only fields are null on CPU
    assert rows[-1]["samples_per_s"] > 0 and rows[-1]["tflops_per_gpu"] > 0
    assert any(r.get("event") == "checkpoint" for r in metrics(tmp_path))
    assert (tmp_path / "samples" / "step-00000003.png").is_file()
    ev = [r for r in metrics(tmp_path) if r.get("event") == "eval"]
    assert len(ev) == 1 and ev[0]["n"] == 4 and 0.0 <= ev[0]["adherence"] <= 1.0
    assert "rank 0" in (tmp_path / "logs" / "rank-0.log").read_text()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "samples" in acc.Tags()["images"]
    assert len(acc.Scalars("train/loss")) == 3
