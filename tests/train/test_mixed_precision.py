"""Mixed precision on the CPU, one process (`model.cpu_mixed_precision: true`): bf16 autocast,
fp16 autocast with GradScaler loss scaling, and bf16 LoRA over a bf16 base.

Stated tolerance: each step's loss within 5e-3 of the fp32 run's (about 1e-3 relative at these
losses of ~5.5; measured here: bf16 4.4e-4, fp16 1.7e-4, over 6 steps of a tiny Llama). The
losses must also differ from fp32 at all, or the reduced precision never ran. Master weights
(and LoRA adapters) stay fp32: `final/` holds only F32 tensors; `export --dtype` writes the
requested dtype. An fp16 run stopped and resumed (the loss scale restored from the checkpoint)
equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import losses, preempt_after
from tuneforge.cli import main
from tuneforge.config import ModelConfig
from tuneforge.train.loop import PREEMPTED_EXIT
from tuneforge.train.precision import compute_dtype

LOSS_TOL = 5e-3
TRAIN = {"lr": 1e-3, "max_steps": 6, "micro_batch_size": 2, "warmup_ratio": 0.0}


def dtypes(folder) -> set[str]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            found |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    return found


def assert_close_to_fp32(got: list[float], want: list[float]) -> None:
    assert len(got) == len(want) == TRAIN["max_steps"]
    assert max(abs(g - w) for g, w in zip(got, want)) <= LOSS_TOL, (got, want)
    assert got != want  # the reduced precision ran


def test_the_cpu_computes_in_fp32_unless_asked():
    bf16 = ModelConfig(dtype="bfloat16")  # the config default dtype
    assert compute_dtype(bf16, "cpu") is None
    assert compute_dtype(bf16, "cuda") == torch.bfloat16
    assert compute_dtype(ModelConfig(dtype="float16", cpu_mixed_precision=True), "cpu") == torch.float16
    assert compute_dtype(ModelConfig(dtype="float32", cpu_mixed_precision=True), "cpu") is None


def test_bf16_and_fp16_autocast_match_fp32_and_keep_fp32_master_weights(run_config, tmp_path):
    assert main(["train", str(run_config("fp32", train=TRAIN))]) == 0
    reference = losses(tmp_path / "fp32")
    for dtype in ("bfloat16", "float16"):
        cfg = run_config(dtype, model={"dtype": dtype, "cpu_mixed_precision": True}, train=TRAIN)
        assert main(["train", str(cfg)]) == 0
        assert_close_to_fp32(losses(tmp_path / dtype), reference)
        assert dtypes(tmp_path / dtype / "final") == {"F32"}  # the master weights
    for dtype, flag, stored in (("bfloat16", "bf16", "BF16"), ("float16", "fp16", "F16")):
        out = tmp_path / f"export-{dtype}"
        assert main(["export", str(tmp_path / dtype / "final"), str(out), "--dtype", flag]) == 0
        assert dtypes(out) == {stored}
        assert json.loads((out / "config.json").read_text())["dtype"] == dtype


def test_bf16_lora_keeps_the_adapter_fp32(run_config, tmp_path):
    lora = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
    assert main(["train", str(run_config("fp32", model=lora, train=TRAIN))]) == 0
    cfg = run_config("bf16", model={**lora, "dtype": "bfloat16", "cpu_mixed_precision": True}, train=TRAIN)
    assert main(["train", str(cfg)]) == 0
    assert_close_to_fp32(losses(tmp_path / "bf16"), losses(tmp_path / "fp32"))
    assert dtypes(tmp_path / "bf16" / "final") == {"F32"}  # the adapter: fp32 over the bf16 base


def test_fp16_resume_is_exact_with_the_loss_scale(run_config, tmp_path):
    sections = dict(model={"dtype": "float16", "cpu_mixed_precision": True},
                    train={**TRAIN, "max_steps": 8, "save_every": 100})
    assert main(["train", str(run_config("whole", **sections))]) == 0
    cfg = run_config("parts", **sections)
    thread = preempt_after(tmp_path / "parts" / "metrics.jsonl", 3)
    assert main(["train", str(cfg)]) == PREEMPTED_EXIT
    thread.join()
    (saved,) = (tmp_path / "parts" / "checkpoints").iterdir()
    scaler = json.loads((saved / "state.json").read_text())["scaler"]
    assert scaler["scale"] > 1 and scaler["growth_interval"] == 2000  # fp16 loss scaling was on
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(tmp_path / "parts") == losses(tmp_path / "whole")  # bit for bit
    got, want = load_file(tmp_path / "parts" / "final" / "model.safetensors"), \
        load_file(tmp_path / "whole" / "final" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_deepspeed_config_follows_the_opt_in(tmp_path, dtype):
    from tuneforge.config import Config
    from tuneforge.parallel.deepspeed_config import resolve_deepspeed_config

    key = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
    plain = Config(model={"dtype": dtype})
    assert resolve_deepspeed_config("zero2", plain, 2, "cpu")[key]["enabled"] is False
    opted = Config(model={"dtype": dtype, "cpu_mixed_precision": True})
    assert resolve_deepspeed_config("zero2", opted, 2, "cpu")[key]["enabled"] is True
