"""Preference objectives on 2 ranks against one process (CPU, gloo, fp32).

With the same global batch (2 ranks x micro 2 x accumulation 2 == 1 process x micro 4 x
accumulation 2) and clipping active, DPO with LoRA (reference = adapter disabled) and full DPO
(reference = the cached pass, computed here by both ranks together), under DDP, FSDP and
DeepSpeed ZeRO-2, and the reward model (full under FSDP, LoRA under DDP and ZeRO-2), must reproduce the single-process losses, gradient norms, eval losses and
final weights: the loss is the mean over the global batch's pairs whatever the split. One
torchrun launch trains every variant; the runs are built once per test session.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from helpers import build_tokenizer, make_tiny_model, write_jsonl
from jobs import assert_matches_single, metric_rows, one_thread, run_config, shared_runs, torchrun
from pref_helpers import pair_records
from tuneforge.cli import main

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
FULL = {"train": {"objective": "dpo", "preference": {"beta": 0.5}}}
ADAPTER = {"train": {"objective": "dpo", "preference": {"beta": 0.5}}, "model": {"lora": LORA}}
ORPO = {"train": {"objective": "orpo"}}
REWARD = {"train": {"objective": "reward"}}
REWARD_LORA = {"train": {"objective": "reward"}, "model": {"lora": LORA}}
has_deepspeed = importlib.util.find_spec("deepspeed") is not None
# name -> (config sections, --deepspeed NAME or None, single-process reference)
VARIANTS = {
    "ddp_dpo": ({**FULL, "parallel": {"strategy": "ddp"}}, None, "single_dpo"),
    "fsdp_zero3_dpo": ({**FULL, "parallel": {"strategy": "fsdp", "zero": 3}}, None, "single_dpo"),
    "ddp_dpo_lora": ({**ADAPTER, "parallel": {"strategy": "ddp"}}, None, "single_dpo_lora"),
    "fsdp_zero2_dpo_lora": ({**ADAPTER, "parallel": {"strategy": "fsdp", "zero": 2}}, None, "single_dpo_lora"),
    "fsdp_zero3_orpo": ({**ORPO, "parallel": {"strategy": "fsdp", "zero": 3}}, None, "single_orpo"),
    "fsdp_zero3_reward": ({**REWARD, "parallel": {"strategy": "fsdp", "zero": 3}}, None, "single_reward"),
    "ddp_reward_lora": ({**REWARD_LORA, "parallel": {"strategy": "ddp"}}, None, "single_reward_lora"),
    **({"zero2_dpo_lora": (ADAPTER, "zero2", "single_dpo_lora"),
        "zero2_reward_lora": (REWARD_LORA, "zero2", "single_reward_lora")} if has_deepspeed else {}),
}
SINGLE = {"single_dpo": FULL, "single_dpo_lora": ADAPTER, "single_orpo": ORPO, "single_reward": REWARD,
          "single_reward_lora": REWARD_LORA}


def pair_config(root: Path, name: str, model: Path, data: Path, sections: dict, micro: int = 2) -> Path:
    """jobs.run_config's equivalence run, on preference data."""
    path = run_config(root, name, model, data, sections, micro)
    tree = yaml.safe_load(path.read_text())
    tree["data"]["datasets"][0]["format"] = "preference"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def _build(root: Path) -> None:
    tokenizer = build_tokenizer()
    model = make_tiny_model(root / "model", tokenizer, tie=True)
    data = write_jsonl(root / "pairs.jsonl", pair_records(48, seed=2, max_words=6))
    with one_thread():
        for name, sections in SINGLE.items():
            assert main(["train", str(pair_config(root, name, model, data, sections, micro=4))]) == 0, name
    specs = []
    for name, (sections, deepspeed, _) in VARIANTS.items():
        config = str(pair_config(root, name, model, data, sections))
        specs.append(f"{config}={deepspeed}" if deepspeed else config)
    torchrun(specs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return shared_runs(tmp_path_factory, "preference_parallel", _build)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_match_one_process(runs, name):
    assert_matches_single(runs / name, runs / VARIANTS[name][2])
    rows = metric_rows(runs / name)
    want = metric_rows(runs / VARIANTS[name][2])
    for w, g in zip(want, rows):  # the metrics are means over the same global pairs
        for key in ("rewards/accuracies", "rewards/margins", "logps/chosen"):
            if key not in w and "reward" in name:
                continue  # a reward model has no log-probs
            assert g[key] == pytest.approx(w[key], abs=1e-5), (key, g["step"])
    evals = metric_rows(runs / name, "eval_loss")
    assert all(0.0 <= r["eval_rewards/accuracies"] <= 1.0 for r in evals)


@pytest.mark.parametrize("name", [n for n in VARIANTS if "reward" in n])
def test_reward_checkpoint_exports_as_the_single_process_one(runs, name, tmp_path):
    """A sharded (FSDP dcp/, DeepSpeed partitions) or adapter checkpoint of a reward model exports,
    merged where it is an adapter, to a sequence-classification folder equal to one process's."""
    import json

    from jobs import assert_close_weights, weights

    def exported(run: Path, out: Path) -> dict:
        assert main(["export", str(run / "checkpoints" / "step_2"), str(out), "--merge-lora"]) == 0
        assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForSequenceClassification"]
        return weights(out)

    got = exported(runs / name, tmp_path / "ranks")
    want = exported(runs / VARIANTS[name][2], tmp_path / "single")
    assert "score.weight" in got
    assert_close_weights(got, want)
