"""Evaluation during training: eval_at_start (step 0), eval_metric accuracy, eval time kept out
of the step time; model.adapter continues an existing adapter."""

import json

import pytest
import torch
from helpers import alpaca_records, write_jsonl

from tuneforge.cli import main


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


class FakeClock:
    """time.time() for the loop and the evaluator: 1 ms per call, plus what `advance` adds."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        self.now += 0.001
        return self.now


def test_eval_at_start_metric_and_timing(run_config, tmp_path, tiny_model_dir, monkeypatch, capsys):
    import tuneforge.train.evaluate as evaluate_module
    import tuneforge.train.loop as loop_module

    clock = FakeClock()
    monkeypatch.setattr(loop_module, "time", clock)
    monkeypatch.setattr(evaluate_module, "time", clock)
    real = evaluate_module.evaluate

    def slow_evaluate(*args, **kwargs):  # every evaluation "takes" 100 s
        clock.now += 100
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluate_module, "evaluate", slow_evaluate)
    held_out = write_jsonl(tmp_path / "eval.jsonl", alpaca_records(6, seed=5))
    cfg = run_config("ev", train={"max_steps": 2, "eval_every": 1, "eval_at_start": True, "eval_metric": "contains",
                                  "eval_metric_samples": 4, "eval_max_new_tokens": 3},
                     data={"eval_datasets": [{"path": str(held_out), "format": "alpaca"}], "template": "chatml"})
    assert main(["train", str(cfg)]) == 0
    rows = _rows(tmp_path / "ev")
    evals = [r for r in rows if "eval_loss" in r]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 1, 2]
    for row in evals:
        assert row["eval_seconds"] >= 100
        assert 0 <= row["eval_accuracy"] <= 1 and row["eval_samples"] == 4
    # each step's time (its tokens / tokens_per_s) leaves out the 100 s evaluations before it
    step_tokens = [steps[0]["tokens"], steps[1]["tokens"] - steps[0]["tokens"]]
    assert all(n / row["tokens_per_s"] < 1.0 for n, row in zip(step_tokens, steps))
    assert "eval_loss" in capsys.readouterr().err

    # the step-0 eval loss is the untrained model's loss on the eval file, as `tuneforge eval` measures it
    monkeypatch.undo()
    out = tmp_path / "base.json"
    assert main(["eval", str(tiny_model_dir), "--data", str(held_out), "--metric", "loss", "--template", "chatml",
                 "--out", str(out)]) == 0
    assert evals[0]["eval_loss"] == pytest.approx(json.loads(out.read_text())["loss"], abs=1e-5)


def test_eval_metric_needs_eval_data(run_config):
    assert main(["train", str(run_config("x", train={"eval_metric": "gsm8k"}))]) == 2
    assert main(["train", str(run_config("y", train={"eval_at_start": True}))]) == 2


def test_model_adapter_continues_an_adapter(run_config, tmp_path, tiny_model_dir):
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file

    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model
    from tuneforge.model.lora import load_adapter

    held_out = write_jsonl(tmp_path / "eval.jsonl", alpaca_records(5, seed=7))
    data = {"eval_datasets": [{"path": str(held_out), "format": "alpaca"}]}
    first = run_config("first", model={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, data=data,
                       train={"max_steps": 3, "eval_every": 3})
    assert main(["train", str(first)]) == 0
    saved = load_file(tmp_path / "first" / "final" / "adapter_model.safetensors")

    # the loaded adapter holds exactly the saved weights, and only they are trainable
    model = load_adapter(load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32")), str(tmp_path / "first"))
    loaded = get_peft_model_state_dict(model)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters() if "lora_" in n}

    # a second run starts from it: its step-0 eval equals the first run's last eval, then it moves on
    second = run_config("second", model={"adapter": str(tmp_path / "first" / "final")}, data=data,
                        train={"max_steps": 2, "eval_at_start": True, "eval_every": 2})
    assert main(["train", str(second)]) == 0
    last_first = [r for r in _rows(tmp_path / "first") if "eval_loss" in r][-1]
    evals = [r for r in _rows(tmp_path / "second") if "eval_loss" in r]
    assert evals[0]["step"] == 0 and evals[0]["eval_loss"] == pytest.approx(last_first["eval_loss"], abs=1e-6)
    assert evals[1]["eval_loss"] != pytest.approx(evals[0]["eval_loss"], abs=1e-6)
    continued = load_file(tmp_path / "second" / "final" / "adapter_model.safetensors")
    assert set(continued) == set(saved) and any(not torch.equal(continued[k], saved[k]) for k in saved)
    config = json.loads((tmp_path / "second" / "final" / "adapter_config.json").read_text())
    assert config["r"] == 4

    bad = run_config("bad", model={"adapter": str(tiny_model_dir)})  # a full model, not an adapter
    assert main(["train", str(bad)]) == 2
    both = run_config("both", model={"adapter": str(tmp_path / "first" / "final"), "lora": {"r": 2}})
    assert main(["train", str(both)]) == 2


def test_plot_shows_eval_accuracy(tmp_path, monkeypatch):
    from tuneforge.train.plot import plot_run

    rows = [{"step": s, "loss": 2.0 / s, "lr": 1e-3, "tokens_per_s": 10.0} for s in (1, 2)]
    rows += [{"step": 2, "eval_loss": 1.5, "eval_accuracy": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    import matplotlib.pyplot as plt

    saved = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        saved.append([line.get_label() for ax in fig.axes for line in ax.get_lines()])
        return real_savefig(fig, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", spy)
    plot_run(tmp_path)
    assert "eval accuracy" in saved[0] and (tmp_path / "metrics.png").is_file()
