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


def test_a_run_started_in_the_same_second_gets_a_later_events_name(tmp_path):
    """The cause of a flake: events files are read in name order, and a second run in the same
    second used to sort by pid and counter (`.10` before `.9`), not by age."""
    import time

    import torch.utils.tensorboard  # noqa: F401  imported now, so that the run below starts within the second

    from tuneforge.train.metrics import MetricsLog

    folder = tmp_path / "tensorboard"
    folder.mkdir()
    earlier = folder / f"events.out.tfevents.{int(time.time()):010d}.~.99999.99"  # '~' sorts after any host name
    earlier.write_bytes(b"")
    log = MetricsLog(tmp_path, resume_step=0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    names = sorted(p.name for p in folder.iterdir())
    assert names[0] == earlier.name and len(names) == 2  # the new file sorts after the earlier one
