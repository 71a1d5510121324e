"""bench/adherence_sweep.train_clock: a sweep under a device call's deadline leaves its scoring time. The fourteenth
session's first medium-preset stage trained to its --max-minutes clock and the call's timeout killed its scoring."""

import argparse

import pytest

from tests.helpers import load_bench


def test_the_deadline_cuts_the_training_clock_to_leave_scoring_time():
    train_clock = load_bench("adherence_sweep").train_clock
    assert train_clock(7.2, None, 69.0, 60.0) == pytest.approx(432.0)  # no deadline: the clock as asked
    # that stage: 69 s of data, a 9-minute deadline, 60 s kept for scoring → 411 s of training, not 432
    assert train_clock(7.2, 9.0, 69.0, 60.0) == pytest.approx(411.0)
    assert train_clock(5.0, 9.0, 10.0, 60.0) == pytest.approx(300.0)  # a deadline that leaves more changes nothing
    assert train_clock(0.5, 4.0, 21.0, 60.0) == pytest.approx(30.0)  # a short clock asked for is not an error
    with pytest.raises(SystemExit, match="leaves 30s of training after 450s of data"):
        train_clock(7.2, 9.0, 450.0, 60.0)


def test_the_next_stages_scenes_made_ahead_are_the_ones_that_stage_takes(tmp_path):
    """--next-data-seed starts this script with --data-only for the next stage's seed; the next stage's make_data
    must find that folder complete and for its own draw (reused, not made again), and the other seeds untouched."""
    sweep, aa = load_bench("adherence_sweep"), load_bench("adherence_ablation")
    a = argparse.Namespace(work=str(tmp_path), data="complex_clean", num=8, chunks=2, next_data_seed=3)
    proc = sweep.data_ahead(a, [32])
    assert proc.wait(timeout=300) == 0, (tmp_path / "data-ahead.log").read_text()
    made = tmp_path / "r32-d3"
    assert sorted(p.name for p in made.iterdir() if p.is_dir()) == ["complex_clean", "complex_noisy"]
    files = lambda: {p: p.stat().st_mtime_ns for p in [*made.rglob("*.tar"), *made.rglob("report.json")]}  # noqa: E731
    stamps = files()
    assert len(list(made.glob("complex_noisy/part*/*.tar"))) >= 2 and len(list(made.rglob("report.json"))) == 2
    report = aa.make_data(made, 8, 2, 32, ("complex_noisy",), 3)  # what the stage with --data-seed 3 calls
    assert report["complex_clean"]["kept"] + report["complex_clean"]["dropped"] == 8
    assert files() == stamps  # reused, not made again
    assert not (tmp_path / "r32-d0").exists()
