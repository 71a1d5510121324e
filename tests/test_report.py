"""`fluxtrain report`: a self-contained HTML page from a (running) run dir, checked as text and in headless Chromium."""

import base64
import json
import math
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from fluxtrain import report

CHROMIUM = "/usr/bin/chromium"
STEPS_LOGGED = 50
PLOTS = 8  # loss, lr, grad norm, throughput, MFU ("n/a on CPU"), memory, data wait, checkpoint stalls
SAMPLES_EMBEDDED = 2  # the newest 2 of 3 grids
DATA_PNG = re.compile(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)">')

CONFIG = """\
[model]
preset = "tiny"
pretrained = "fluxtrain/assets/tiny-flux"

[data]
source = "synthetic"
resolution = 64

[train]
output_dir = "runs/demo"
steps = 100
batch_size = 16

[optim]
lr = 0.001
schedule = "cosine"

[parallel]
strategy = "FULL_SHARD"
mixed_precision = "fp32"
"""


def _row(step):
    return {"step": step, "time": 1000.0 + 2 * step, "loss": 1.0 / math.sqrt(step) + 0.05 * math.sin(step),
            "lr": 1e-3 * min(1.0, step / 20), "grad_norm": 2.0 / step, "samples_per_s": 40.0 + step % 5,
            "tokens_per_s": 3200.0, "tflops_per_gpu": 0.01, "mfu": None, "step_time_s": 0.4,
            "data_wait_s": 0.01 * (step % 7), "mem_gib": None, "mem_peak_gib": None, "mem_reserved_gib": None,
            "host_rss_gib": 1.5 + step / 100, "data_skipped": 0, "nonfinite_steps": 0}


def _grid(path, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((128, 256, 3), np.uint8)
    img[:, :128] = rng.integers(0, 255, 3)  # two coloured tiles with a noisy border
    img[:, 128:] = rng.integers(0, 255, 3)
    img[:8] = rng.integers(0, 255, (8, 256, 3))
    Image.fromarray(img).save(path)


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    (d / "samples").mkdir(parents=True)
    (d / "config.toml").write_text(CONFIG)
    lines = [json.dumps(_row(s)) for s in range(1, STEPS_LOGGED + 1)]
    lines.insert(25, json.dumps({"step": 25, "time": 1051.0, "event": "checkpoint", "stall_s": 1.25}))
    # a running run: the writer is in the middle of step 51's line
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n" + json.dumps(_row(51))[:40])
    for i, step in enumerate((10, 20, 30)):
        _grid(d / "samples" / f"step-{step:08d}.png", seed=i)
    return d


def test_report_html(run_dir, capsys):
    assert report.main([str(run_dir)]) == 0
    out = run_dir / "report.html"
    assert capsys.readouterr().out.strip() == str(out)
    page = out.read_text()
    imgs = DATA_PNG.findall(page)
    assert len(imgs) == page.count("<img") == PLOTS + SAMPLES_EMBEDDED
    for _, b64 in imgs:
        assert base64.b64decode(b64)[:8] == b"\x89PNG\r\n\x1a\n"
    alts = [alt for alt, _ in imgs]
    assert alts[-2:] == ["step-00000030.png", "step-00000020.png"]  # newest first; step 10 left out
    assert "step-00000010.png" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained

    summary = dict(re.findall(r"<tr><th>([^<]*)</th><td>([^<]*)</td></tr>", page))
    last = _row(STEPS_LOGGED)
    assert summary["steps"] == f"{STEPS_LOGGED} / 100"
    assert summary["status"].startswith("running or stopped")
    assert summary["last loss"] == f"{last['loss']:.4g}"
    assert summary["median samples/s"] == "42"
    assert summary["median MFU"] == "n/a on CPU"
    assert summary["peak host RSS"] == "2 GiB"
    assert summary["peak GPU memory"] == "n/a"
    assert summary["checkpoints"] == "1 (stall total 1.25 s)"
    assert summary["parallel.strategy"] == "FULL_SHARD" and summary["optim.lr"] == "0.001"
    assert "partially written" in page
    assert "n/a on CPU" in page and "no adherence measured" in page


def test_report_adherence_resume_and_out(run_dir, tmp_path):
    m = run_dir / "metrics.jsonl"
    text = m.read_text().rsplit("\n", 1)[0] + "\n"  # the partial line completed elsewhere: drop it
    text += json.dumps({"step": 40, "time": 1.0, "event": "resume", "path": "x", "resharded": False}) + "\n"
    text += json.dumps({**_row(45), "loss": 9.0}) + "\n"  # re-run after the resume: the later row wins
    text += json.dumps({"step": 50, "time": 2.0, "event": "eval", "adherence": {"overall": 0.5, "n": 8}}) + "\n"
    m.write_text(text)
    out = tmp_path / "elsewhere" / "r.html"
    assert report.main([str(run_dir), "--out", str(out)]) == 0
    page = out.read_text()
    assert len(DATA_PNG.findall(page)) == PLOTS + 1 + SAMPLES_EMBEDDED  # + the adherence plot
    assert "partially written" not in page and "no adherence measured" not in page
    rows, events, _ = report.read_metrics(m)
    assert [r["step"] for r in rows] == list(range(1, STEPS_LOGGED + 1)) and rows[44]["loss"] == 9.0
    assert [e["event"] for e in events] == ["checkpoint", "resume", "eval"]


def test_report_empty_and_missing_run(tmp_path, capsys):
    (tmp_path / "fresh").mkdir()
    # a folder that is no run wrote a report of nothing, exit 0
    assert report.main([str(tmp_path / "fresh")]) == 2 and not (tmp_path / "fresh" / "report.html").exists()
    assert "is not a run folder (no metrics.jsonl or config.toml)" in capsys.readouterr().err
    (tmp_path / "fresh" / "config.toml").write_text('[train]\nsteps = 10\n')
    assert report.main([str(tmp_path / "fresh")]) == 0  # started, nothing logged yet
    page = (tmp_path / "fresh" / "report.html").read_text()
    assert "<img" not in page and "no steps logged yet" in page
    assert report.main([str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"fluxtrain: error: {tmp_path / 'nope'} is not a folder")


def test_ema_is_bias_corrected():
    assert report.ema([2.0, 2.0, 2.0]) == pytest.approx([2.0, 2.0, 2.0])  # no warm-up bias towards 0
    assert report.ema([0.0, 10.0]) == pytest.approx([0.0, (0.1 * 10) / (1 - 0.9**2)])
    first, second = report.ema([float("nan"), 1.0])  # a NaN loss is skipped, not propagated
    assert math.isnan(first) and second == pytest.approx(1.0)


def _chromium(*args, user_data_dir, timeout=120):
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


# Added to a copy of the report for the DOM check: after load, record what the browser decoded.
PROBE = """<script>window.addEventListener("load", () => {
  const imgs = [...document.images];
  document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.images = imgs.length;
});</script></body>"""


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f"{CHROMIUM} is not installed (apt-get install -y chromium); the HTML is checked as text "
                           "by test_report_html")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    out = report.write_report(run_dir)
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", PROBE))
    res = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), user_data_dir=tmp_path / "prof1")
    dom = res.stdout
    assert res.returncode == 0 and "<body" in dom, res.stderr[-2000:]
    n = PLOTS + SAMPLES_EMBEDDED
    assert f'data-images="{n}"' in dom and f'data-decoded="{n}"' in dom, re.findall(r"<body[^>]*>", dom)
    assert '<table id="summary">' in dom and "n/a on CPU" in dom
    for sid in ("loss", "lr", "grad-norm", "throughput", "mfu", "memory", "data-wait", "checkpoints", "samples"):
        assert f'id="{sid}"' in dom

    shot = tmp_path / "shot.png"
    res = _chromium(f"--screenshot={shot}", "--window-size=1200,3000", "--hide-scrollbars",
                    "--virtual-time-budget=10000", out.as_uri(), user_data_dir=tmp_path / "prof2")
    assert shot.exists(), (res.returncode, res.stderr[-2000:])
    px = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert px.shape == (3000, 1200)
    assert px.var() > 100, "screenshot is blank"
    assert (px < 128).mean() > 0.005  # text, lines and grids were drawn, not just a white page
