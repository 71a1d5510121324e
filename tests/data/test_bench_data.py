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
