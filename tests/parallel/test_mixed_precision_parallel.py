"""Mixed precision across ranks on the CPU (`model.cpu_mixed_precision: true`, 2 ranks, gloo):
FSDP2 with `MixedPrecisionPolicy` (bf16 parameters for compute, fp32 gradient reduction) and
DeepSpeed ZeRO-2 with its `bf16` section, against the fp32 single process with the same global
batch (2 ranks x micro 2 x accumulation 2 == 1 process x micro 4 x accumulation 2).

Stated tolerance: each step's loss within 1e-2 of the fp32 run's (bf16 has 8 mantissa bits;
measured over these 4 steps: FSDP 5.5e-4, DeepSpeed 1.8e-3), and different from it (bf16 ran).
The final weights are fp32 (FSDP's sharded master parameters; DeepSpeed's fp32 partitions)
and within 2e-2 relative of the fp32 run's (measured: 4.6e-3 FSDP, 5.0e-3 DeepSpeed). A resumed FSDP bf16 run equals the uninterrupted
one bit for bit, and its checkpoint exports to the dtype asked for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import alpaca_records, build_tokenizer, make_tiny_model, write_jsonl
from jobs import (
    assert_close_weights, metric_rows, one_thread, resume_copy_on_two_ranks, run_config, shared_runs, torchrun_specs,
    weights,
)
from tuneforge.cli import main

BF16 = {"model": {"dtype": "bfloat16", "cpu_mixed_precision": True}}
LOSS_TOL, WEIGHT_REL = 1e-2, 2e-2
has_deepspeed = importlib.util.find_spec("deepspeed") is not None
VARIANTS = {  # name -> (config sections, --deepspeed NAME or None)
    "fsdp_bf16": ({**BF16, "parallel": {"strategy": "fsdp", "zero": 3}}, None),
    **({"deepspeed_bf16": (BF16, "zero2")} if has_deepspeed else {}),
}


def _build(root: Path) -> None:
    tokenizer = build_tokenizer()
    model = make_tiny_model(root / "model", tokenizer, tie=True)
    data = write_jsonl(root / "train.jsonl", alpaca_records(64))
    with one_thread():
        assert main(["train", str(run_config(root, "single", model, data, micro=4))]) == 0
    torchrun_specs(root, model, data, VARIANTS)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return shared_runs(tmp_path_factory, "mixed_precision", _build)


def dtypes(folder: Path) -> set[str]:
    found = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            found |= {handle.get_slice(k).get_dtype() for k in handle.keys()}
    return found


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_on_two_ranks_stays_close_to_fp32(runs, name):
    want, got = metric_rows(runs / "single"), metric_rows(runs / name)
    assert len(got) == len(want) == 4
    deltas = [abs(g["loss"] - w["loss"]) for g, w in zip(got, want)]
    assert max(deltas) <= LOSS_TOL, deltas
    assert max(deltas) > 0  # bf16 ran
    assert [g["loss_tokens"] for g in got] == [w["loss_tokens"] for w in want]
    assert dtypes(runs / name / "final") == {"F32"}  # fp32 master weights
    assert_close_weights(weights(runs / name / "final"), weights(runs / "single" / "final"), rel=WEIGHT_REL)


def test_deepspeed_ran_its_bf16_engine(runs):
    if not has_deepspeed:
        pytest.skip("deepspeed is not installed (optional extra)")
    done = [line for line in (runs / "worker.log").read_text().splitlines() if "deepspeed_bf16.yaml" in line]
    assert len(done) == 1 and "ZeRO-2, offload off, bf16," in done[0], done


def test_fsdp_bf16_resume_is_exact_and_exports_the_asked_dtype(runs, tmp_path):
    proc = resume_copy_on_two_ranks(runs, "fsdp_bf16", tmp_path / "resumed")
    assert "step_2" in proc.stderr
    step_2 = tmp_path / "resumed" / "checkpoints" / "step_2"
    assert main(["export", str(step_2), str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    assert dtypes(tmp_path / "bf16") == {"BF16"}


def test_fsdp_policy_gathers_bf16_parameters_and_keeps_fp32_shards(tmp_path):
    """What `model.cpu_mixed_precision` asks of FSDP2: a layer unsharded for compute holds bf16
    parameters, while the sharded (master) parameters the optimizer steps stay fp32."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.parallel.fsdp import apply_fsdp
    from tuneforge.train.loss import CausalLMLoss

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        root = apply_fsdp(CausalLMLoss(model, 64), init_device_mesh("cpu", (1,)), zero=3, param_dtype=torch.bfloat16)
        layer = model.model.layers[0]
        layer.unshard()
        assert layer.self_attn.q_proj.weight.dtype == torch.bfloat16
        layer.reshard()
        assert {p.dtype for p in root.parameters()} == {torch.float32}
    finally:
        dist.destroy_process_group()
