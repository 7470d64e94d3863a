"""DDP and FSDP2 against one process, on the CPU over gloo with 2 ranks, fp32.

With the same global batch (2 ranks x micro 2 x accumulation 2 == 1 process x micro 4 x
accumulation 2), every strategy must reproduce the single-process losses (|d| <= 1e-5), eval
losses (on eval rows that do not split evenly over the ranks) and final weights (relative
<= 1e-4), with gradient clipping active. A resumed run must equal the
uninterrupted one bit for bit, an FSDP checkpoint must export to a plain transformers folder,
and the launchers (NPROC_PER_NODE through the CLI, SLURM's variables) must start real runs.

Launches are few, because each costs seconds of imports and rendezvous: one torchrun launch
(`strategy_worker.py`) trains all seven distributed variants in one process group; the
resume tests are one CLI launch (FSDP) and one simulated SLURM launch (DDP, LoRA with
dropout, so each rank's RNG state must be restored). Under pytest-xdist the shared runs are
built once per session (a file lock) and only read by the tests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import alpaca_records, build_tokenizer, losses, make_tiny_model, write_jsonl
from jobs import (
    assert_close_weights, assert_matches_single, check, child_env, metric_rows, one_thread,
    run_config, shared_runs, torchrun, weights,
)
from tuneforge.cli import main
from tuneforge.parallel.launch import free_port

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
# name -> (config sections, single-process reference)
DISTRIBUTED = {
    "ddp": ({"parallel": {"strategy": "ddp"}}, "single"),
    "fsdp_zero2": ({"parallel": {"strategy": "fsdp", "zero": 2}}, "single"),
    "fsdp_zero3": ({"parallel": {"strategy": "auto", "zero": 3}}, "single"),  # auto on 2 ranks -> fsdp
    "fsdp_zero3_offload": ({"parallel": {"strategy": "fsdp", "zero": 3, "offload": True}}, "single"),
    "ddp_lora": ({"parallel": {"strategy": "ddp"}, "model": {"lora": LORA}}, "single_lora"),
    "fsdp_zero3_lora": ({"parallel": {"strategy": "fsdp", "zero": 3}, "model": {"lora": LORA}}, "single_lora"),
    # no single-process twin (dropout masks differ); resumed under SLURM in its own test
    "ddp_lora_dropout": ({"parallel": {"strategy": "ddp"}, "model": {"lora": {**LORA, "dropout": 0.1}}}, None),
}
# --------------------------------------------------------------------------- the shared runs


def _build(root: Path) -> None:
    tokenizer = build_tokenizer()
    model = make_tiny_model(root / "model", tokenizer, tie=True)  # FSDP must keep the shared embedding shared
    data = write_jsonl(root / "train.jsonl", alpaca_records(64))
    with one_thread():
        for name, sections in [("single", {}), ("single_lora", {"model": {"lora": LORA}})]:
            assert main(["train", str(run_config(root, name, model, data, sections, micro=4))]) == 0, name
    torchrun([str(run_config(root, name, model, data, sections)) for name, (sections, _) in DISTRIBUTED.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder holding every run (built once per test session, also under pytest-xdist)."""
    return shared_runs(tmp_path_factory, "strategies", _build)


def copy_run(runs: Path, name: str, dest: Path) -> Path:
    shutil.copytree(runs / name, dest)
    return dest


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", [n for n, (_, ref) in DISTRIBUTED.items() if ref])
def test_two_ranks_match_one_process(runs, name):
    assert_matches_single(runs / name, runs / DISTRIBUTED[name][1])
    if "lora" in name:
        assert (runs / name / "final" / "adapter_config.json").is_file()


def test_every_rank_reports_time_tokens_and_memory(runs):
    for name in DISTRIBUTED:
        rows = metric_rows(runs / name)
        previous = 0
        for row in rows:
            columns = ("rank_forward_s", "rank_step_s", "rank_tokens", "rank_peak_mem_gb")
            assert [len(row[c]) for c in columns] == [2, 2, 2, 2]
            assert sum(row["rank_tokens"]) == row["tokens"] - previous  # the ranks' tokens make the step
            assert all(0 < f < s for f, s in zip(row["rank_forward_s"], row["rank_step_s"]))
            assert all(m > 0 for m in row["rank_peak_mem_gb"])
            assert "slow_rank" in row
            previous = row["tokens"]


def test_slow_rank_note():
    from tuneforge.train.rankstats import slow_rank_note

    assert slow_rank_note([1.0, 1.1, 0.9, 1.0]) is None
    assert slow_rank_note([1.0, 1.0, 2.0, 1.0]) == "rank 2 2.0x"
    assert slow_rank_note([0.2, 0.7]) == "rank 1 1.6x"  # 2 ranks: the median is their mean
    assert slow_rank_note([1.0]) is None


def test_strategy_selection():
    from tuneforge.config import ParallelConfig
    from tuneforge.errors import UserError
    from tuneforge.train.run import resolve_strategy

    assert resolve_strategy(ParallelConfig(), 1) == "single"
    assert resolve_strategy(ParallelConfig(), 2) == "fsdp"
    assert resolve_strategy(ParallelConfig(zero=2), 8) == "fsdp"
    assert resolve_strategy(ParallelConfig(zero=1), 8) == "ddp"
    assert resolve_strategy(ParallelConfig(strategy="ddp"), 2) == "ddp"
    assert resolve_strategy(ParallelConfig(strategy="fsdp"), 1) == "single"
    assert resolve_strategy(ParallelConfig(), 2, deepspeed="zero2") == "deepspeed"
    with pytest.raises(UserError, match="single runs one process"):
        resolve_strategy(ParallelConfig(strategy="single"), 2)
    with pytest.raises(UserError, match="zero must be 2 or 3"):
        resolve_strategy(ParallelConfig(strategy="fsdp", zero=1), 2)
    with pytest.raises(UserError, match="conflicts"):
        resolve_strategy(ParallelConfig(strategy="ddp"), 2, deepspeed="zero2")


# --------------------------------------------------------------------------- resume and launchers


def test_fsdp_resume_through_the_cli_is_exact(runs, tmp_path):
    """`NPROC_PER_NODE=2 tuneforge train ... --resume` continues the sharded step-2 checkpoint
    of the FSDP run and ends exactly where the uninterrupted run ended."""
    work = copy_run(runs, "fsdp_zero3", tmp_path / "resumed")
    shutil.rmtree(work / "final")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(runs / "fsdp_zero3.yaml"),
                           "--work-dir", str(work), "--resume"],
                          env=child_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    check(proc)
    assert "fsdp (zero 3, offload off) on 2 ranks, gloo on cpu" in proc.stderr
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert losses(work) == losses(runs / "fsdp_zero3")  # bit for bit
    got, want = weights(work / "final"), weights(runs / "fsdp_zero3" / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_ddp_resume_under_slurm_is_exact(runs, tmp_path):
    """Two tasks started as srun would (SLURM_PROCID/NTASKS/LOCALID/NODELIST) resume the DDP
    LoRA-with-dropout run at step 2 and train its last 2 steps exactly as the first launch did."""
    work = copy_run(runs, "ddp_lora_dropout", tmp_path / "resumed")
    shutil.rmtree(work / "final")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(runs / "ddp_lora_dropout.yaml"),
                               "--work-dir", str(work), "--launcher", "slurm", "--resume"],
                              env=child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                                            SLURM_NODELIST="localhost", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    assert "ddp on 2 ranks" in outputs[0] and "resumed from" in outputs[0]
    assert "resumed from" not in outputs[1]  # rank 1 does not log
    assert losses(work) == losses(runs / "ddp_lora_dropout")  # bit for bit, dropout included
    got, want = weights(work / "final"), weights(runs / "ddp_lora_dropout" / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_resume_on_another_number_of_ranks_fails_clearly(runs, tmp_path, capsys):
    work = copy_run(runs, "fsdp_zero3", tmp_path / "one_rank")
    assert main(["train", str(runs / "fsdp_zero3.yaml"), "--work-dir", str(work), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "was written by 2 data-parallel ranks, this run has 1" in err
    assert "Traceback" not in err


# --------------------------------------------------------------------------- checkpoints and export


def test_fsdp_checkpoint_is_sharded_and_exports_to_plain_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = runs / "fsdp_zero3" / "checkpoints" / "step_2"
    assert sorted(p.name for p in (ckpt / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not list((ckpt / "model").glob("*.safetensors"))  # the weights are only in the shards
    assert json.loads((ckpt / "state.json").read_text())["format"] == "dcp"

    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs / "single" / "checkpoints" / "step_2" / "model",
                                                     dtype=torch.float32).eval()
    assert not list((tmp_path / "exported").glob("*.distcp"))
    assert_close_weights(exported.state_dict(), reference.state_dict())
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got, want = exported(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5


def test_fsdp_lora_checkpoint_holds_the_gathered_adapter(runs):
    ckpt = runs / "fsdp_zero3_lora" / "checkpoints" / "step_2"
    assert (ckpt / "model" / "adapter_config.json").is_file()
    got = weights(ckpt / "model")
    want = weights(runs / "single_lora" / "checkpoints" / "step_2" / "model")
    assert_close_weights(got, want)
    assert all("lora_" in key for key in got)  # the frozen base stays out of checkpoints
