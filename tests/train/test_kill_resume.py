"""A small version of tests/stress/kill_resume.py: SIGKILL at random moments, resume, and
the loss curve equals the uninterrupted run's bit for bit."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "stress"))

from kill_resume import run  # noqa: E402


def test_three_random_kills_leave_the_loss_curve_identical(tmp_path):
    result = run(kills=3, seed=1, work=tmp_path, steps=8)
    assert result["kills"] == 3
    assert len(result["reference"]) == 8
    assert result["resumed"] == result["reference"]
