"""bench/adherence_sweep.train_clock: a sweep under a device call's deadline leaves its scoring time. The fourteenth
session's first medium-preset stage trained to its --max-minutes clock and the call's timeout killed its scoring."""

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
