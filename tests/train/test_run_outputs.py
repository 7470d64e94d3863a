"""What a run leaves behind and the verbs that read it: eval rows, plot, export, chat, work-dir rules."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import losses

from tuneforge.cli import main


def test_eval_rows_plot_export_and_chat(run_config, tmp_path, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = run_config("full", train={"micro_batch_size": 2, "max_steps": 4, "save_every": 2, "eval_every": 2,
                                    "eval_prompts": ["the fox"]},
                     data={"eval_split": 0.1}, model={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "full"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["eval_loss"] > 0 and r["samples"][0]["prompt"] == "the fox" for r in evals)
    for key in ("step", "loss", "lr", "grad_norm", "tokens", "loss_tokens", "tokens_per_s", "elapsed_s", "mfu", "peak_mem_gb"):
        assert key in rows[0]
    assert len(losses(run)) == 4

    assert main(["plot", str(run)]) == 0
    png = run / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # export the step-2 checkpoint with the adapter merged: plain transformers, same logits
    out = tmp_path / "merged"
    assert main(["export", str(run / "checkpoints" / "step_2"), str(out), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, run / "checkpoints" / "step_2" / "model")
    ids = torch.tensor([[3, 10, 20, 30, 40, 4]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted(ids).logits, atol=1e-5)

    answer = subprocess.run([sys.executable, "-m", "tuneforge", "chat", str(tiny_model_dir), "--adapter",
                             str(run / "final"), "--template", "chatml", "--prompt", "hi", "--max-new-tokens", "5"],
                            capture_output=True, text=True, timeout=300)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip() != "" or answer.stdout == "\n"


def test_work_dir_rules(run_config, tmp_path):
    cfg = run_config("rules", train={"max_steps": 1})
    assert main(["train", str(cfg)]) == 0
    assert main(["train", str(cfg)]) == 2  # holds a run: refused
    assert main(["train", str(cfg), "--resume"]) == 2  # no checkpoints to resume from
    assert main(["train", str(cfg), "--force"]) == 0
    other = run_config("rules", train={"max_steps": 2, "save_every": 1}, model={"lora": {"r": 2}})
    assert main(["train", str(other), "--force"]) == 0
    plain = run_config("rules", train={"max_steps": 2})
    assert main(["train", str(plain), "--resume"]) == 2  # model.lora changed: incompatible


def test_training_flops_count_gqa_and_packed_attention():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.train.metrics import matmul_parameter_count, model_flop_shape, training_flops

    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=100)
    model = LlamaForCausalLM(cfg)
    head_dim = 8
    per_layer = 64 * 8 * head_dim + 2 * 64 * 2 * head_dim + 8 * head_dim * 64 + 3 * 64 * 128  # q, k+v (GQA), o, mlp
    assert matmul_parameter_count(model) == 2 * per_layer
    shape = model_flop_shape(cfg)
    packed = training_flops(shape, 2 * per_layer, tokens=100, loss_tokens=40, sum_sq_seqlens=60**2 + 40**2)
    dense = training_flops(shape, 2 * per_layer, tokens=100, loss_tokens=40, sum_sq_seqlens=100**2)
    expected_attention = 3 * 4 * 8 * head_dim * 2 * (60**2 + 40**2)
    expected = 3 * (2 * 2 * per_layer * 100 + 2 * 64 * 100 * 40) + expected_attention
    assert packed == expected
    assert dense - packed == 3 * 4 * 8 * head_dim * 2 * (100**2 - 60**2 - 40**2)
