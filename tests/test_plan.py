"""The memory planner: the ZeRO paper's anchors, component scaling, and the recommendation."""

import json
import re
import subprocess
import sys

import pytest

from tuneforge.plan import ModelShape, Setup, estimate, recommend

SEVEN_B = ModelShape(params=7_000_000_000, hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32,
                     head_dim=128, vocab=32000)


@pytest.mark.parametrize("zero,expected", [(1, 38.5), (2, 26.25), (3, 14.0)])
def test_zero_anchors_7b_on_8_gpus(zero, expected):
    result = estimate(SEVEN_B, Setup(devices=8, zero=zero))
    assert result["model_states"] == pytest.approx(expected)


def test_components_scale_as_expected():
    base = estimate(SEVEN_B, Setup(devices=8, zero=3, max_length=4096))
    assert estimate(SEVEN_B, Setup(devices=8, zero=3, max_length=4096, sequence_parallel=2))["activations"] == \
        pytest.approx(base["activations"] / 2)
    ckpt = estimate(SEVEN_B, Setup(devices=8, zero=3, max_length=4096, checkpointing=True))
    assert ckpt["activations"] < base["activations"] / 5
    offload = estimate(SEVEN_B, Setup(devices=8, zero=3, offload=True))
    assert offload["optimizer"] == 0 and offload["params"] == 0 and offload["host_offload"] > 0
    lora = estimate(SEVEN_B, Setup(devices=1, zero=0, lora_rank=16))
    qlora = estimate(SEVEN_B, Setup(devices=1, zero=0, lora_rank=16, bits=4))
    assert lora["params"] == pytest.approx(14.0) and qlora["params"] == pytest.approx(7 * 0.5625)
    assert lora["optimizer"] < 1.0  # only the adapter carries Adam states
    embedded = ModelShape(**{**SEVEN_B.__dict__, "embed_params": 262_144_000})  # 32000 x 4096, untied
    on_gpu = estimate(embedded, Setup(devices=1, zero=0, lora_rank=16, bits=4))
    assert on_gpu["params"] == pytest.approx(((7e9 - 262_144_000) * 0.5625 + 262_144_000 * 4) / 1e9)
    on_cpu = estimate(embedded, Setup(devices=1, zero=0, lora_rank=16, bits=4, device="cpu"))
    assert on_cpu["params"] == pytest.approx(on_gpu["params"]) and on_cpu["overhead"] == pytest.approx(0.45 + 0.12)
    from tuneforge.plan import suggestions

    cpu_lora = Setup(devices=1, zero=0, lora_rank=16, device="cpu", checkpointing=True)
    assert "model.quantization: {bits: 4} (QLoRA)" in [text for text, _ in suggestions(embedded, cpu_lora)]


def test_recommendation_is_the_smallest_change_that_fits():
    setup = Setup(devices=8, zero=2, device_memory_gb=27, max_length=2048, checkpointing=True)
    assert estimate(SEVEN_B, setup)["total"] > 27
    assert recommend(SEVEN_B, setup) == "parallel.zero: 3"
    assert recommend(SEVEN_B, Setup(devices=8, zero=3, device_memory_gb=80)) is None


def test_plan_cli_json(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300).save_pretrained(tmp_path)
    (tmp_path / "c.yaml").write_text(f"model: {{path: {tmp_path}}}\n")
    out = subprocess.run([sys.executable, "-m", "tuneforge", "plan", str(tmp_path / "c.yaml"), "--gpus", "8",
                          "--gpu-memory", "80", "--json"], capture_output=True, text=True, check=True)
    report = json.loads(out.stdout)
    assert report["fits"] is True and report["per_device_gb"]["total"] > 0 and report["recommendation"] is None


def test_every_shipped_recipe_validates_and_plans(capsys):
    from tuneforge.config import load_config
    from tuneforge.plan import run_plan
    from tuneforge.recipes import recipe_names, recipe_path
    from tuneforge.train.run import deepspeed_context, resolve_strategy

    names = recipe_names()
    assert len(names) >= 7
    for name in names:
        text = recipe_path(name).read_text()
        assert text.startswith("# ") and "Launch:" in text, name  # header: what it is and how to launch it
        cfg = load_config(recipe_path(name))
        assert run_plan(cfg, gpus=8, gpu_memory=80, as_json=True) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["per_device_gb"]["total"] > 0, name
        # the launch its header gives is accepted: strategy, mesh and DeepSpeed checks that run before any rank starts
        nproc = int(re.search(r"NPROC_PER_NODE=(\d+)", text).group(1)) if "NPROC_PER_NODE=" in text else 1
        nnodes = int(re.search(r"NNODES=(\d+)", text).group(1)) if "NNODES=" in text else 1
        deepspeed = re.search(r"--deepspeed (\w+)", text)
        deepspeed = deepspeed.group(1) if deepspeed else None
        strategy = resolve_strategy(cfg.parallel, nproc * nnodes, deepspeed)
        if strategy == "deepspeed":
            deepspeed_context(cfg, None, deepspeed)
        for line in re.findall(r"^#\s+(mpirun .*)$", text, re.M):
            check_mpirun_line(line, name, nproc * nnodes)


def check_mpirun_line(line: str, recipe: str, world: int) -> None:
    """A recipe's mpirun launch: as many processes as its torchrun launch, spread over the -H hosts,
    rank 0's host passed as MASTER_ADDR, and a `tuneforge train RECIPE --launcher mpi` the CLI accepts."""
    from tuneforge.cli import build_parser

    words = line.split()
    np_ = int(words[words.index("-np") + 1])
    hosts = dict(h.split(":") for h in words[words.index("-H") + 1].split(","))
    assert np_ == world == sum(int(n) for n in hosts.values()), (recipe, line)
    assert f"MASTER_ADDR={next(iter(hosts))}" in words, (recipe, line)  # the first host runs rank 0
    args = build_parser().parse_args(words[words.index("tuneforge") + 1:])
    assert (args.verb, args.config, args.launcher) == ("train", f"{recipe}.yaml", "mpi"), (recipe, line)


def test_list_and_copy_configs(tmp_path, capsys):
    from tuneforge.cli import main

    assert main(["list-configs", "internlm2"]) == 0
    listed = capsys.readouterr().out
    assert "internlm2_chat_7b_qlora_oasst1_2gpu" in listed and "smollm2" not in listed
    assert main(["copy-config", "internlm2_20b_full_zero3_8gpu", str(tmp_path)]) == 0
    assert (tmp_path / "internlm2_20b_full_zero3_8gpu.yaml").is_file()
    assert main(["copy-config", "internlm2_20b_full_zero3_8gpu", str(tmp_path)]) == 2
    assert main(["copy-config", "internlm2_20b_ful", str(tmp_path)]) == 2
    assert "did you mean" in capsys.readouterr().err


def test_cpu_lora_activations_grow_with_the_heap_trim_slack_up_to_untrimmed():
    from tuneforge.plan import CPU_LORA_ACTIVATION_FACTOR

    def activations(**kw):
        return estimate(SEVEN_B, Setup(device="cpu", lora_rank=16, max_length=512, **kw))["activations"]

    trimmed = activations(heap_slack=0.0)
    assert activations(heap_slack=0.5) == pytest.approx(1.5 * trimmed)
    untrimmed = activations(heap_trim=False)
    assert untrimmed == pytest.approx(trimmed * CPU_LORA_ACTIVATION_FACTOR["untrimmed"] / CPU_LORA_ACTIVATION_FACTOR["trimmed"])
    assert activations(heap_slack=5.0) == pytest.approx(untrimmed)
