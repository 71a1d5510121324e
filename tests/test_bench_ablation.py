"""bench/adherence_ablation.py: the compile warm-up, which runs while the data sets are made, must compile the model
that the arms train. v9 fine-tuned a `deep` base, and the warm-up compiled the `small` preset (the --preset default),
so the arms found no cached graphs and compiled their own."""

import argparse
import json

from fluxtrain import config as C
from fluxtrain.models.presets import transformer_kwargs
from fluxtrain.models.setup import model_kwargs
from tests.helpers import load_bench


def _shape(cmd: list[str]) -> dict:
    """The transformer shape a `python -m fluxtrain train --config F ...` command line builds."""
    i = cmd.index("train")
    assert cmd[i + 1] == "--config"
    return model_kwargs(C.load(cmd[i + 2], cmd[i + 3:]))


def test_the_compile_warm_up_builds_the_bases_shape_not_the_presets(tmp_path, monkeypatch):
    aa = load_bench("adherence_ablation")
    deep = transformer_kwargs("deep")
    assert deep != transformer_kwargs("small")  # else this test would not tell them apart
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps(deep))
    (base / "model_index.json").write_text("{}")
    a = argparse.Namespace(config="configs/ablation-small.toml", preset="small", caption_dropout=0.1, batch=256,
                           itc_weight=0.1, itc_sigma_scale=1.0, cuda_graphs=True, base=str(base), encoders=None,
                           resolution=None, ema_decay=0.995, source="cache", steps=1000, lr=1e-4, schedule="cosine")
    started = []
    monkeypatch.setattr(aa.subprocess, "Popen", lambda cmd, **kw: started.append(cmd))
    aa.warm_compile_cache(a, tmp_path, 0)
    assert len(started) == 3  # no ITC, ITC, CUDA graphs
    run = aa.train_args(a, tmp_path / "data", tmp_path / "run", 0, None, True)
    assert _shape(run) == deep
    for cmd in started:
        assert _shape(cmd) == deep
    # without a base (the sweep, a from-scratch ablation) both build the preset
    a.base = None
    started.clear()
    aa.warm_compile_cache(a, tmp_path, 0)
    assert _shape(started[0]) == _shape(aa.train_args(a, tmp_path / "data", tmp_path / "run", 0, None, True)) \
        == transformer_kwargs("small")


def test_a_later_call_skips_the_warm_up_only_for_the_same_runs(tmp_path, monkeypatch, capsys):
    """The warm-up is skipped where the work folder's stamp says an earlier call on this machine warmed the caches
    for the same command lines and base shape; another base shape at the same path, or other runs, warm up again."""
    aa = load_bench("adherence_ablation")
    base = tmp_path / "base"
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps(transformer_kwargs("deep")))
    a = argparse.Namespace(config="configs/ablation-small.toml", preset="small", caption_dropout=0.1, batch=256,
                           itc_weight=0.1, itc_sigma_scale=1.0, cuda_graphs=True, base=str(base), encoders=None,
                           resolution=None, ema_decay=0.995, source="cache", steps=1000, lr=1e-4, schedule="cosine")
    started = []
    monkeypatch.setattr(aa.subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or cmd)
    procs, key = aa.start_warm_up(a, tmp_path, 0)
    assert len(procs) == 3
    procs, again = aa.start_warm_up(a, tmp_path, 0)  # the first warm-up has not succeeded (no stamp): again
    assert len(procs) == 3 and again == key
    (tmp_path / aa.WARM_STAMP).write_text(key)  # what main writes once every warm-up process exits 0
    procs, _ = aa.start_warm_up(a, tmp_path, 0)
    assert procs == [] and "no warm-up" in capsys.readouterr().out
    (base / "transformer" / "config.json").write_text(json.dumps(transformer_kwargs("small")))  # another shape
    procs, other = aa.start_warm_up(a, tmp_path, 0)
    assert len(procs) == 3 and other != key and not (tmp_path / aa.WARM_STAMP).exists()
    (tmp_path / aa.WARM_STAMP).write_text(other)
    a.cuda_graphs = False  # other runs: no CUDA-graph warm-up process, another key
    procs, _ = aa.start_warm_up(a, tmp_path, 0)
    assert len(procs) == 2
