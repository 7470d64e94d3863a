"""DeepSpeed ZeRO against one process, on the CPU over gloo with 2 ranks, fp32.

With the same global batch (2 ranks x micro 2 x accumulation 2 == 1 process x micro 4 x
accumulation 2) and clipping active, ZeRO-1, -2, -3, -2/-3 + CPU offload and LoRA under ZeRO-2/-3
must reproduce the single-process losses (|d| <= 1e-5), gradient norms and eval losses, and end
with the same weights (relative <= 1e-4). The variants are chosen every way a user can: `--deepspeed
NAME` (with and without the `deepspeed_` prefix), a JSON file, and `parallel.strategy: deepspeed`
with `parallel.zero`/`offload`. A resumed ZeRO-3 run (through the CLI, NPROC_PER_NODE=2) must equal
the uninterrupted one bit for bit, a ZeRO-3 checkpoint must export to a folder plain transformers
loads, a resume on another number of ranks and a missing DeepSpeed must fail in one line.

Launches are few: one torchrun launch (`strategy_worker.py`) trains all eight variants in one
process group, then one CLI launch resumes. Under pytest-xdist the shared runs are built once per
session (a file lock) and only read by the tests.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import alpaca_records, build_tokenizer, losses, make_tiny_model, write_config, write_jsonl
from jobs import (
    assert_close_weights, assert_matches_single, check, child_env, metric_rows, one_thread,
    run_config, shared_runs, torchrun, weights,
)
from tuneforge.cli import main

LORA = {"r": 4, "alpha": 8, "dropout": 0.0}
USER_JSON = {"zero_optimization": {"stage": 2, "overlap_comm": False}, "train_micro_batch_size_per_gpu": "auto",
             "steps_per_print": 10**9}
# name -> (config sections, --deepspeed NAME or None, single-process reference)
VARIANTS = {
    "zero1": ({}, "zero1", "single"),
    "zero2": ({}, "deepspeed_zero2", "single"),
    "zero2_json": ({}, "USER_JSON", "single"),  # a user's JSON file (path filled in by _build)
    "zero3": ({"parallel": {"strategy": "deepspeed", "zero": 3}}, None, "single"),
    "zero2_offload": ({"parallel": {"strategy": "deepspeed", "zero": 2, "offload": True}}, None, "single"),
    "zero3_offload": ({}, "zero3_offload", "single"),
    "zero2_lora": ({"parallel": {"strategy": "deepspeed", "zero": 2}, "model": {"lora": LORA}}, None, "single_lora"),
    "zero3_lora": ({"model": {"lora": LORA}}, "zero3", "single_lora"),
}
has_deepspeed = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not has_deepspeed, reason="deepspeed is not installed (optional extra)")


def _build(root: Path) -> None:
    tokenizer = build_tokenizer()
    model = make_tiny_model(root / "model", tokenizer, tie=True)  # ZeRO-3 must keep the shared embedding shared
    data = write_jsonl(root / "train.jsonl", alpaca_records(64))
    (root / "user.json").write_text(json.dumps(USER_JSON))
    with one_thread():
        for name, sections in [("single", {}), ("single_lora", {"model": {"lora": LORA}})]:
            assert main(["train", str(run_config(root, name, model, data, sections, micro=4))]) == 0, name
    specs = []
    for name, (sections, deepspeed, _) in VARIANTS.items():
        deepspeed = str(root / "user.json") if deepspeed == "USER_JSON" else deepspeed
        config = run_config(root, name, model, data, sections)
        specs.append(f"{config}={deepspeed}" if deepspeed else str(config))
    proc = torchrun(specs)
    (root / "worker.log").write_text(proc.stdout + proc.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder holding every run (built once per test session, also under pytest-xdist)."""
    return shared_runs(tmp_path_factory, "deepspeed", _build)


# --------------------------------------------------------------------------- equivalence


@needs_deepspeed
@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_match_one_process(runs, name):
    reference = VARIANTS[name][2]
    assert_matches_single(runs / name, runs / reference)
    for w, g in zip(metric_rows(runs / reference), metric_rows(runs / name)):
        assert g["lr"] == pytest.approx(w["lr"], rel=1e-12)  # our schedule, stepped once per optimizer step
        assert len(g["rank_tokens"]) == 2
    if "lora" in name:
        assert (runs / name / "final" / "adapter_config.json").is_file()


@needs_deepspeed
def test_no_comm_op_is_compiled(runs):
    """DeepSpeed's CPU shared-memory all-reduce op (a ~1 min JIT build) is never built."""
    log = (runs / "worker.log").read_text()
    assert "shm_comm" not in log and "built successfully" not in log
    assert "DeepSpeedContext(zero3_offload: ZeRO-3, offload on, fp32, rank 0/2, cpu)" in log


# --------------------------------------------------------------------------- checkpoints


@needs_deepspeed
@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_lora"])
def test_checkpoint_is_deepspeeds_own_inside_ours(runs, name):
    from tuneforge.train.checkpoint import is_complete, latest_checkpoint

    ckpt = latest_checkpoint(runs / name / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_2" and is_complete(ckpt, verify_hashes=True)
    state = json.loads((ckpt / "state.json").read_text())
    assert state["format"] == "deepspeed" and state["world_size"] == 2
    assert state["zero_stage"] == int(name[4])
    files = {p.name for p in (ckpt / "deepspeed" / "state").iterdir()}
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= files  # every rank's partition
    assert not (ckpt / "deepspeed" / "latest").exists()  # ours is the only `latest` logic
    assert not list(runs.glob(f"{name}/checkpoints/.tmp-*"))
    if "lora" in name:
        got = weights(ckpt / "model")
        assert all("lora_" in key for key in got)  # the frozen base stays out
        assert_close_weights(got, weights(runs / "single_lora" / "checkpoints" / "step_2" / "model"))
    else:
        assert not list((ckpt / "model").glob("*.safetensors"))  # the weights are in DeepSpeed's files


@needs_deepspeed
def test_zero3_checkpoint_exports_to_plain_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = runs / "zero3" / "checkpoints" / "step_2"
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs / "single" / "checkpoints" / "step_2" / "model",
                                                     dtype=torch.float32).eval()
    assert not list((tmp_path / "exported").glob("*.pt"))
    assert_close_weights(exported.state_dict(), reference.state_dict())
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        got, want = exported(input_ids=ids).logits, reference(input_ids=ids).logits
    assert (got - want).abs().max() <= 1e-5


@needs_deepspeed
def test_zero3_resume_through_the_cli_is_exact(runs, tmp_path):
    """`NPROC_PER_NODE=2 tuneforge train ... --resume` continues the step-2 checkpoint of the
    ZeRO-3 run (strategy from the config) and ends exactly where the uninterrupted run ended."""
    work = tmp_path / "resumed"
    shutil.copytree(runs / "zero3", work)
    shutil.rmtree(work / "final")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(runs / "zero3.yaml"),
                           "--work-dir", str(work), "--resume"],
                          env=child_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    check(proc)
    assert "deepspeed zero3 (ZeRO-3, offload off) on 2 ranks, gloo on cpu" in proc.stderr
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert losses(work) == losses(runs / "zero3")  # bit for bit
    got, want = weights(work / "final"), weights(runs / "zero3" / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@needs_deepspeed
def test_resume_on_another_number_of_ranks_fails_clearly(runs, tmp_path):
    work = tmp_path / "one_rank"
    shutil.copytree(runs / "zero2", work)
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(runs / "zero2.yaml"), "--deepspeed", "zero2",
                           "--work-dir", str(work), "--resume"],
                          env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was written by 2 data-parallel ranks, this run has 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_another_zero_stage_is_refused_before_loading(tmp_path):
    from types import SimpleNamespace

    from tuneforge.errors import UserError
    from tuneforge.parallel.deepspeed_engine import check_resume

    check_resume({"zero_stage": 3}, SimpleNamespace(stage=3), tmp_path)
    with pytest.raises(UserError, match="written by DeepSpeed ZeRO-2, this run uses ZeRO-3.*--deepspeed zero2"):
        check_resume({"zero_stage": 2}, SimpleNamespace(stage=3), tmp_path)


# --------------------------------------------------------------------------- requests and errors


BLOCKED = "import sys; sys.modules['deepspeed'] = None; from tuneforge.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("spawn", [False, True], ids=["one_process", "nproc_per_node"])
def test_missing_deepspeed_is_one_line_with_the_install_command(tmp_path, spawn):
    """`import deepspeed` fails (as when it is not installed): exit 2 and one line, before any
    rank starts (NPROC_PER_NODE) or any process group is created."""
    tokenizer = build_tokenizer()
    model = make_tiny_model(tmp_path / "model", tokenizer)
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
    cfg = write_config(tmp_path / "cfg.yaml", model, [{"path": str(data), "format": "alpaca"}])
    env = child_env(**({"NPROC_PER_NODE": "2"} if spawn else {}))
    proc = subprocess.run([sys.executable, "-c", BLOCKED, "train", str(cfg), "--deepspeed", "zero2"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: DeepSpeed requested but not installed "
                     "(install it with: DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed)"]
    assert not (tmp_path / "run").exists()


def test_config_choice_and_refusals(tmp_path):
    from tuneforge.config import ParallelConfig, load_config
    from tuneforge.errors import ConfigError, UserError
    from tuneforge.parallel.deepspeed_engine import check_request, config_name
    from tuneforge.train.run import resolve_strategy

    assert config_name(ParallelConfig(strategy="deepspeed", zero=3, offload=True), None) == "zero3_offload"
    assert config_name(ParallelConfig(strategy="deepspeed", zero=2), None) == "zero2"
    assert config_name(ParallelConfig(zero=1), "zero3") == "zero3"  # --deepspeed wins
    with pytest.raises(ConfigError, match="offload needs ZeRO stage 2 or 3"):
        config_name(ParallelConfig(strategy="deepspeed", zero=1, offload=True), None)
    assert resolve_strategy(ParallelConfig(strategy="deepspeed"), 1) == "deepspeed"  # one process too

    if not has_deepspeed:
        return
    cfg = load_config(None, base={})
    for body, message in [({"optimizer": {"type": "AdamW"}}, "sets 'optimizer', but tuneforge builds"),
                          ({"scheduler": {"type": "WarmupLR"}}, "sets 'scheduler', but tuneforge builds"),
                          ({"zero_optimization": {"stage": 0}}, "stage must be 1, 2 or 3")]:
        path = tmp_path / "ds.json"
        path.write_text(json.dumps(body))
        with pytest.raises(ConfigError, match=message):
            check_request(cfg, str(path))
    tp = load_config(None, base={"parallel": {"tensor_parallel": 2}})
    with pytest.raises(UserError, match="not available with DeepSpeed"):
        check_request(tp, "zero2")
