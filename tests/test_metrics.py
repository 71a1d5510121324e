"""FLOPs hand count, MFU, throughput arithmetic and the metric writers (jsonl + TensorBoard)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtrain import metrics
from fluxtrain.metrics import MetricsWriter, Throughput, flux_flops_per_sample, peak_tflops
from fluxtrain.models.presets import FLUX_DEV


class Clock:
    """A perf_counter that moves only when the test says so."""

    def __init__(self, monkeypatch, now=100.0):
        self.now = now
        monkeypatch.setattr(metrics.time, "perf_counter", lambda: self.now)


def test_flux_dev_flops_hand_count():
    # FLUX.1-dev: width d = 24 heads × 128 = 3072, 19 double + 38 single blocks, 1024² → 64×64 packed latents.
    d, img, txt = 3072, 4096, 512
    S = img + txt  # 4608: joint attention over text + image tokens
    # Per layer and token: attention q, k, v, out = 4d² MACs, MLP d→4d→d = 8d² MACs → 12d² MACs = 24d² FLOPs
    # (a single block's fused linear1 d→7d + linear2 5d→d is the same 12d²). Attention QKᵀ and AV: 2·S²·d MACs.
    per_layer = 24 * d**2 * S + 4 * S**2 * d
    layers = 19 + 38
    # Embedders: x_embedder 64→d on image tokens, context_embedder 4096→d on text tokens, proj_out d→64;
    # per-sample AdaLN modulation: double block 2 streams × (d→6d), single block d→3d, final d→2d.
    embed = 2 * 64 * d * img + 2 * 4096 * d * txt + 2 * d * 64 * img
    modulation = 2 * d**2 * (19 * 2 * 6 + 38 * 3 + 2)
    training = 3 * (layers * per_layer + embed + modulation)  # forward + backward (2× forward)

    assert training / 1e12 == pytest.approx(223.2, abs=0.05)
    got = flux_flops_per_sample(FLUX_DEV, img_tokens=img, txt_tokens=txt)
    assert got == pytest.approx(training, rel=1e-12)
    assert flux_flops_per_sample(FLUX_DEV, img, txt, training=False) == pytest.approx(training / 3, rel=1e-12)


def test_mfu_against_the_h100_peak(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    assert peak_tflops(cuda) == 989.0
    clock = Clock(monkeypatch)
    thr = Throughput(flops_per_sample=223.2e12, tokens_per_sample=4608, world_size=8, device=cuda)
    thr.add(16, 0.0)  # 16 samples over 8 GPUs in 2 s
    clock.now += 2.0
    out = thr.report(steps=1)
    assert out["tflops_per_gpu"] == pytest.approx(16 / 2 * 223.2 / 8)  # 223.2 TFLOP/s per GPU
    assert out["mfu"] == pytest.approx(223.2 / 989.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Some Unknown GPU")
    assert peak_tflops(cuda) is None


def test_mfu_is_none_on_cpu():
    assert peak_tflops(torch.device("cpu")) is None
    thr = Throughput(1e9, 10, 1, torch.device("cpu"))
    thr.add(4, 0.0)
    assert thr.report(1)["mfu"] is None


def test_throughput_report_arithmetic(monkeypatch):
    clock = Clock(monkeypatch, now=10.0)
    thr = Throughput(flops_per_sample=2e12, tokens_per_sample=100, world_size=2, device=torch.device("cpu"))
    for _ in range(4):  # 4 steps of 8 global samples, 0.5 s data wait each, 1 s each
        thr.add(8, 0.5)
        clock.now += 1.0
    out = thr.report(steps=4)
    assert out["samples_per_s"] == pytest.approx(32 / 4)
    assert out["tokens_per_s"] == pytest.approx(8 * 100)
    assert out["tflops_per_gpu"] == pytest.approx(8 * 2e12 / 2 / 1e12)
    assert out["step_time_s"] == pytest.approx(1.0)
    assert out["data_wait_s"] == pytest.approx(0.5)
    assert out["mfu"] is None
    thr.add(3, 0.25)  # report() reset the window: one step of 3 samples in 1 s
    clock.now += 1.0
    out = thr.report(steps=1)
    assert out["samples_per_s"] == pytest.approx(3.0) and out["data_wait_s"] == pytest.approx(0.25)


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    png = tmp_path / "grid.png"
    Image.fromarray(np.tile(np.arange(32, dtype=np.uint8)[:, None, None] * 8, (1, 48, 3))).save(png)
    w = MetricsWriter(tmp_path, enabled=True, trackers=["tensorboard"])
    w.log(1, {"loss": 0.5, "lr": 1e-4, "mfu": None, "flag": True})
    w.log(2, {"loss": 0.25, "lr": 1e-4, "mfu": None, "flag": True})
    w.event(2, "checkpoint", stall_s=1.5)
    w.image(2, "samples", png)
    w.close()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert rows[0]["loss"] == 0.5 and rows[0]["mfu"] is None and "time" in rows[0]
    assert rows[2]["event"] == "checkpoint" and rows[2]["stall_s"] == 1.5

    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 0.5), (2, 0.25)]
    assert [e.value for e in acc.Scalars("checkpoint/stall_s")] == [1.5]
    assert "train/mfu" not in tags["scalars"] and "train/flag" not in tags["scalars"]  # None and bools skipped
    (img,) = acc.Images("samples")
    assert (img.step, img.width, img.height) == (2, 48, 32)
    assert img.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_writer_disabled_writes_nothing(tmp_path):
    w = MetricsWriter(tmp_path, enabled=False, trackers=["tensorboard"])
    w.log(1, {"loss": 1.0})
    w.event(1, "checkpoint", stall_s=0.1)
    w.close()
    assert list(tmp_path.iterdir()) == []
