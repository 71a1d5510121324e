"""bench/adherence_ablation.make_data reuses a work folder only for the data it was made for: a warm-started stage
(bench/gpu_chain.sh, --data-seed STAGE) once trained on the last stage's scenes because they were taken as made."""

import pytest

from tests.helpers import load_bench


def load_ablation():
    return load_bench("adherence_ablation")


def test_make_data_reuses_only_the_same_draw(tmp_path):
    aa = load_ablation()
    first = aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=0)
    assert sum(first["simple_clean"].values()) == 6
    shard = next((tmp_path / "simple_noisy" / "part0").glob("*.tar"))
    made_at = shard.stat().st_mtime_ns
    assert aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=0) == first  # the same draw: reused
    assert shard.stat().st_mtime_ns == made_at
    with pytest.raises(SystemExit, match="made with .*'seed': 0.* not .*'seed': 1"):
        aa.make_data(tmp_path, 6, 1, 32, only=("simple_noisy",), seed=1)


def test_ablation_refuses_a_base_that_is_not_an_export(tmp_path):
    """--base must be an exported diffusers folder: a wrong path stops before any data is made."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    res = subprocess.run([sys.executable, str(ROOT / "bench" / "adherence_ablation.py"), "--work", str(tmp_path / "w"),
                          "--out", str(tmp_path / "o"), "--base", str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 1 and "not an exported diffusers folder" in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "w" / "simple_noisy").exists()
