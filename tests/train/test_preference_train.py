"""Preference objectives through `tuneforge train`: accumulation, exact resume, the cached
reference of full fine-tuning, falling DPO loss, check-data on pairs."""

import json

import numpy as np
import pytest
import torch

from helpers import losses, train_then_sigkill
from pref_helpers import metric_rows, weights, pref_config
from tuneforge.cli import main

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}


@pytest.mark.parametrize("objective,packing,lora", [("dpo", "soft", True), ("dpo", "none", False), ("orpo", "soft", False),
                                                    ("simpo", "none", True), ("reward", "soft", True),
                                                    ("reward", "none", False)])
def test_accumulation_equals_one_big_micro_batch(tmp_path, tiny_model_dir, objective, packing, lora):
    """Pairs, not rows or tokens, normalise the loss: m x k == (m k) x 1 in losses, metrics and weights."""
    runs = {}
    for micro, acc in [(4, 1), (2, 2), (1, 4)]:
        name = f"m{micro}a{acc}"
        cfg = pref_config(tmp_path, tiny_model_dir, name, objective, n_pairs=40,
                          train={"micro_batch_size": micro, "gradient_accumulation": acc, "max_steps": 3,
                                 "preference": {"beta": 0.5}},
                          data={"packing": packing, "max_length": 80}, model={"lora": LORA} if lora else {})
        assert main(["train", str(cfg)]) == 0
        runs[name] = (metric_rows(tmp_path / name), weights(tmp_path / name / "final"))
    ref_rows, ref_w = runs.pop("m4a1")
    for name, (rows, w) in runs.items():
        for want, got in zip(ref_rows, rows, strict=True):
            for key in ("loss", "grad_norm", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
                if objective == "reward" and key.startswith("logps/"):
                    continue  # a reward model has no log-probs
                assert got[key] == pytest.approx(want[key], abs=1e-5, rel=1e-5), (name, key, got["step"])
        for key in ref_w:
            assert float((w[key] - ref_w[key]).norm() / ref_w[key].norm()) < 1e-4, (name, key)


def test_full_dpo_reference_is_cached_initial_model(tmp_path, tiny_model_dir, tokenizer):
    """The cached table holds the initial model's answer log-prob sums, each pair run on its own;
    the first step's loss is log 2 (policy == reference); a second run reads the table back."""
    from transformers import AutoModelForCausalLM

    from tuneforge.data import cache
    from tuneforge.data.preference import read_pairs, encode_pairs
    from tuneforge.data.templates import get_template

    cfg = pref_config(tmp_path, tiny_model_dir, "full", "dpo", n_pairs=12, data={"max_length": 80, "eval_split": 0.25},
                      train={"eval_every": 2, "max_steps": 2})
    assert main(["train", str(cfg)]) == 0
    assert losses(tmp_path / "full")[0] == pytest.approx(np.log(2), abs=1e-6)
    entries = [p for p in (tmp_path / "cache").iterdir() if (p / "logps.npy").is_file()]
    assert len(entries) == 1
    table = np.load(entries[0] / "logps.npy")
    enc = encode_pairs(read_pairs(tmp_path / "pairs.jsonl"), get_template("chatml", tokenizer), tokenizer, 80, "right")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    for k in range(len(enc.offsets) - 1):  # every pair, train and eval, each sequence alone
        ids = torch.as_tensor(enc.tokens[enc.offsets[k]: enc.offsets[k + 1]], dtype=torch.long)
        mask = torch.as_tensor(enc.trained[enc.offsets[k]: enc.offsets[k + 1]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
        want = logp.gather(1, ids[1:, None])[:, 0][mask[1:]].sum()
        assert table[enc.origin[k], k % 2] == pytest.approx(float(want), abs=1e-4)
    stamp = entries[0].stat().st_mtime_ns
    cfg2 = pref_config(tmp_path, tiny_model_dir, "again", "dpo", data={"max_length": 80, "eval_split": 0.25},
                       train={"max_steps": 1, "eval_every": 2})  # eval_split needs eval_every (preflight)
    assert main(["train", str(cfg2)]) == 0
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir() if (p / "logps.npy").is_file()] == [stamp]


def test_sigkill_then_resume_is_bit_exact(tmp_path, tiny_model_dir):
    sections = dict(train={"micro_batch_size": 2, "max_steps": 8, "save_every": 2, "keep_last": 1},
                    data={"max_length": 80})
    assert main(["train", str(pref_config(tmp_path, tiny_model_dir, "whole", "dpo", **json.loads(json.dumps(sections))))]) == 0
    reference = metric_rows(tmp_path / "whole")
    cfg = pref_config(tmp_path, tiny_model_dir, "crash", "dpo", **sections)
    train_then_sigkill(cfg, tmp_path / "crash" / "metrics.jsonl", rows=5)
    assert (tmp_path / "crash" / "checkpoints").is_dir()
    assert main(["train", str(cfg), "--resume"]) == 0
    resumed = metric_rows(tmp_path / "crash")
    keys = ("step", "loss", "grad_norm", "rewards/chosen", "rewards/rejected", "logps/chosen")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in reference]  # bit for bit
    for key, value in weights(tmp_path / "whole" / "final").items():
        assert torch.equal(value, weights(tmp_path / "crash" / "final")[key])


def test_dpo_learns_the_preference(tmp_path, tiny_model_dir):
    cfg = pref_config(tmp_path, tiny_model_dir, "learn", "dpo", n_pairs=16,
                      train={"micro_batch_size": 4, "max_steps": 12, "lr": 1e-2, "preference": {"beta": 0.5}},
                      data={"max_length": 80}, model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    assert main(["train", str(cfg)]) == 0
    rows = metric_rows(tmp_path / "learn")
    assert rows[0]["loss"] == pytest.approx(np.log(2), abs=1e-6)  # LoRA B = 0: policy == reference
    assert np.mean([r["loss"] for r in rows[-3:]]) < 0.5 and np.mean([r["rewards/accuracies"] for r in rows[-3:]]) > 0.9
    assert (tmp_path / "learn" / "final" / "adapter_model.safetensors").is_file()


def test_check_data_reports_pairs(tmp_path, tiny_model_dir, capsys):
    cfg = pref_config(tmp_path, tiny_model_dir, "check", "dpo", n_pairs=10, data={"max_length": 80})
    assert main(["check-data", str(cfg), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs_read"] == 10 and report["pairs"] + report["pairs_dropped"] == 10
    assert report["samples"] == 10 and report["row_length"] == 160 and report["max_length"] == 80
    assert main(["check-data", str(cfg)]) == 0
    assert "pairs" in capsys.readouterr().out


def test_preference_data_needs_a_preference_objective(tmp_path, tiny_model_dir, capsys):
    cfg = pref_config(tmp_path, tiny_model_dir, "bad", "sft")
    assert main(["train", str(cfg)]) == 2
    assert "train.objective" in capsys.readouterr().err


def test_plot_draws_reward_accuracy(tmp_path, tiny_model_dir):
    import matplotlib.image

    cfg = pref_config(tmp_path, tiny_model_dir, "plotted", "simpo", data={"max_length": 80, "eval_split": 0.2},
                      train={"max_steps": 2, "eval_every": 2})
    assert main(["train", str(cfg)]) == 0
    assert main(["plot", str(tmp_path / "plotted"), "--out", str(tmp_path / "p.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "p.png").shape[0] == 1200  # four panels (loss, lr, tokens/s, reward accuracy)
    sft = tmp_path / "sft_like"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0}) + "\n")
    assert main(["plot", str(sft), "--out", str(tmp_path / "s.png")]) == 0
    assert matplotlib.image.imread(tmp_path / "s.png").shape[0] == 900
