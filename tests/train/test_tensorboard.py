"""TensorBoard events mirror metrics.jsonl, also across a resume: the resumed run's events
replace the earlier run's from the resume step on (purge_step), so no step appears twice."""

import pytest
from helpers import losses

from tuneforge.cli import main

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def tensorboard_events(folder):
    return event_accumulator.EventAccumulator(str(folder)).Reload()


def test_events_follow_metrics_through_a_resume(run_config, tmp_path):
    cfg = run_config("tb", train={"max_steps": 6, "save_every": 3})
    assert main(["train", str(cfg)]) == 0
    first = losses(tmp_path / "tb")
    assert main(["train", str(cfg), "--resume", str(tmp_path / "tb" / "checkpoints" / "step_3")]) == 0
    assert len(list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per run
    events = tensorboard_events(tmp_path / "tb" / "tensorboard")
    scalars = [(e.step, e.value) for e in events.Scalars("loss")]
    assert [step for step, _ in scalars] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in scalars] == pytest.approx(losses(tmp_path / "tb"), rel=1e-6)
    assert losses(tmp_path / "tb") == first  # the resumed steps are the same steps
    assert {"lr", "grad_norm", "tokens_per_s"} <= set(events.Tags()["scalars"])
