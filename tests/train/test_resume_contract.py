"""--resume honours or refuses, never ignores: a new lr and schedule length take effect
(by the documented rule), settings that change the data stream or the model are refused in
one line; checkpoints are verified against their manifest before use."""

import json
import math

import pytest

from tuneforge.cli import main
from tuneforge.train.optim import lr_factor


def rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def stopped_run(run_config, tmp_path):
    """A 6-step run with checkpoints at steps 2 and 4; returns (config, run dir)."""
    cfg = run_config("run", train={"max_steps": 6, "save_every": 2, "keep_last": 3, "lr_scheduler": "linear"})
    assert main(["train", str(cfg)]) == 0
    return cfg, tmp_path / "run"


def test_new_lr_and_length_take_effect_on_resume(stopped_run, capsys):
    cfg, run = stopped_run
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", str(run / "checkpoints" / "step_2"),
                 "train.lr=0.5", "train.max_steps=8", "train.warmup_ratio=0.25"]) == 0
    assert "these changes take effect: train.max_steps: 6 -> 8; train.lr: 0.001 -> 0.5" in capsys.readouterr().err
    logged = rows(run)
    assert [r["step"] for r in logged] == list(range(1, 9))
    warmup = math.ceil(0.25 * 8)
    for r in logged[2:]:  # the rule: new lr x new schedule at the restored position (step - 1)
        assert r["lr"] == pytest.approx(0.5 * lr_factor(r["step"] - 1, 8, warmup, "linear"), rel=1e-12), r["step"]
    assert logged[2]["lr"] != logged[1]["lr"]
    assert "lr: 0.5" in (run / "config.yaml").read_text()


def test_changes_to_the_data_or_model_are_refused_in_one_line(stopped_run, capsys):
    cfg, run = stopped_run
    before = rows(run)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", "data.max_length=80", "data.packing=none",
                 "train.micro_batch_size=2", "model.attn_implementation=eager", "train.lr=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    for change in ("data.max_length: 96 -> 80", "data.packing: 'soft' -> 'none'", "train.micro_batch_size: 1 -> 2",
                   "model.attn_implementation: 'auto' -> 'eager'"):
        assert change in err[0]
    assert "train.lr" not in err[0]  # allowed, so not listed
    assert rows(run) == before


def test_a_changed_data_file_is_refused(stopped_run, tmp_path, capsys):
    cfg, run = stopped_run
    other = tmp_path / "other.jsonl"
    other.write_text((tmp_path / "train.jsonl").read_text())
    assert main(["train", str(cfg), "--resume", f"data.datasets.0.path={other}"]) == 2
    assert f"data.datasets.0.path: '{tmp_path / 'train.jsonl'}' -> '{other}'" in capsys.readouterr().err


def flip_a_weight_bit(step_dir):
    weights = next((step_dir / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x10
    weights.write_bytes(bytes(data))
    return weights


def break_the_header(step_dir):
    weights = next((step_dir / "model").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[8:12] = b"}}}}"  # the JSON header right after its 8-byte length
    weights.write_bytes(bytes(data))
    return weights


@pytest.mark.parametrize("corrupt", [flip_a_weight_bit, break_the_header])
def test_corrupt_checkpoint_is_named_and_the_previous_one_used(stopped_run, capsys, corrupt):
    cfg, run = stopped_run
    reference = [r["loss"] for r in rows(run)]
    damaged = corrupt(run / "checkpoints" / "step_4")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 0
    err = capsys.readouterr().err
    assert (f"checkpoint {run / 'checkpoints' / 'step_4'} is corrupt (model/{damaged.name} does not match "
            "its sha256 in manifest.json)") in err
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in err
    assert [r["loss"] for r in rows(run)] == reference  # steps 3-6 redone from step 2, identical


def test_no_intact_checkpoint_stops_with_exit_2(stopped_run, capsys):
    cfg, run = stopped_run
    flip_a_weight_bit(run / "checkpoints" / "step_2")
    flip_a_weight_bit(run / "checkpoints" / "step_4")
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err
    assert main(["train", str(cfg), "--resume", str(run / "checkpoints" / "step_4")]) == 2
    assert "step_4 is not intact: model/" in capsys.readouterr().err


def test_a_data_file_edited_in_place_is_refused(stopped_run, tmp_path, capsys):
    cfg, run = stopped_run
    data = tmp_path / "train.jsonl"
    records = [json.loads(line) for line in data.read_text().splitlines()]
    records[0]["output"] = "an answer edited after the run started"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    before = rows(run)
    capsys.readouterr()
    assert main(["train", str(cfg), "--resume", str(run / "checkpoints" / "step_2")]) == 2
    assert f"--resume: the training data changed since {run / 'checkpoints' / 'step_2'} was written" in capsys.readouterr().err
    assert rows(run) == before
