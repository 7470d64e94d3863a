"""QLoRA on the CPU (bitsandbytes 4-bit NF4): a tiny model trains, its adapter loads with PEFT
on a 4-bit base, and `export --merge-lora` writes a plain float32 folder that computes what
the 4-bit base + adapter computes; a run resumed from its checkpoint ends bit for bit as the
uninterrupted one.

Tolerances, from measured errors on this tiny model (logits up to ~0.7):
- merged folder vs 4-bit base + adapter: the merge adds B·A into the same dequantized NF4
  weights the 4-bit layers use, so only float32 rounding differs (measured 2.4e-7): atol 1e-5;
- merged folder vs the *full-precision* base + adapter: NF4 quantization error, which is
  measured in the test as max |logits(fp32 base) - logits(4-bit base)| (0.075 here; the merged
  model was 0.069 away): allowed up to 1.5x that measured error.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from helpers import losses

pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tuneforge.cli import main  # noqa: E402
from tuneforge.config import ModelConfig, QuantizationConfig  # noqa: E402
from tuneforge.model.load import load_model  # noqa: E402
from tuneforge.model.lora import QUANTIZATION_NOTE, quantized_bits  # noqa: E402


def logits(model, ids):
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits.float()


def test_qlora_trains_loads_on_4bit_base_and_merges(run_config, tiny_model_dir, tmp_path):
    cfg = run_config("qlora", model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "quantization": {"bits": 4}},
                     train={"lr": 3e-3, "max_steps": 12, "micro_batch_size": 2, "warmup_ratio": 0.0, "save_every": 6})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "qlora"
    curve = losses(run)
    assert sum(curve[-4:]) / 4 < sum(curve[:4]) / 4 - 0.05, curve  # the loss falls
    for folder in (run / "final", run / "checkpoints" / "step_6" / "model"):
        assert json.loads((folder / QUANTIZATION_NOTE).read_text())["bits"] == 4
    resumed = tmp_path / "resumed"  # the step-6 checkpoint over a fresh 4-bit base continues exactly
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("final"))
    assert main(["train", str(cfg), "--work-dir", str(resumed), "--resume"]) == 0
    assert losses(resumed) == losses(run)
    got, want = (load_file(folder / "final" / "adapter_model.safetensors") for folder in (resumed, run))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    quantized = ModelConfig(path=str(tiny_model_dir), dtype="float32", quantization=QuantizationConfig(bits=4))
    full = ModelConfig(path=str(tiny_model_dir), dtype="float32")
    ids = torch.randint(0, 250, (2, 40), generator=torch.Generator().manual_seed(0))
    on_4bit = PeftModel.from_pretrained(load_model(quantized), str(run / "final"))
    assert quantized_bits(on_4bit) == 4  # PEFT put the adapter over Linear4bit layers
    expected = logits(on_4bit, ids)

    assert main(["export", str(run / "final"), str(tmp_path / "merged"), "--merge-lora"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert quantized_bits(merged) is None
    got = logits(merged, ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    quant_error = (logits(load_model(quantized), ids) - logits(load_model(full), ids)).abs().max().item()
    on_full = logits(PeftModel.from_pretrained(load_model(full), str(run / "final")), ids)
    off = (got - on_full).abs().max().item()
    assert off <= 1.5 * quant_error, (off, quant_error)
    assert off > 100 * (got - expected).abs().max().item()  # merged into the NF4 weights, not the fp32 ones

