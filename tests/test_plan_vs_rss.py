"""The planner against reality on CPU: predicted vs measured peak RSS of real training runs
(tiny to ~100M-parameter Llama shapes, full, LoRA and QLoRA) agree within ±20%."""

import json
import subprocess
import sys

import pytest
from helpers import alpaca_records, build_tokenizer, write_config, write_jsonl

SHAPES = {
    "tiny-full": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2), None, 96, 2),
    "small-full": (dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=4), None, 512, 2),
    "mid-lora": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2), 16, 512, 2),
    "mid-lora-untrimmed": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                                num_key_value_heads=2), 16, 512, 2),
    "mid-qlora": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                       num_key_value_heads=2), 16, 512, 2),
    "mid-qlora-short": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                             num_key_value_heads=2), 16, 128, 2),
    "mid-full": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2), None, 512, 2),
    "mid-lora-short": (dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2), 16, 128, 2),
    "smollm2-shape-lora": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3), 16, 512, 1),
    "smollm2-shape-qlora": (dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                 num_key_value_heads=3), 16, 512, 1),
}

MEASURE = """
import sys
from tuneforge.cli import main
from tuneforge.train.rankstats import peak_rss_bytes
code = main(sys.argv[1:])
print("PEAK_KB", peak_rss_bytes() // 1024)
raise SystemExit(code)
"""


@pytest.mark.parametrize("name", list(SHAPES))
def test_predicted_peak_rss_within_20_percent(tmp_path, name):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.config import load_config
    from tuneforge.plan import model_shape, estimate, setup_from_config

    dims, lora, length, micro = SHAPES[name]
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(LlamaConfig(**dims, vocab_size=len(tokenizer), max_position_embeddings=1024,
                                 tie_word_embeddings=False)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(400))
    cfg_path = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                            model={"lora": {"r": lora, "alpha": 2 * lora, "dropout": 0.0} if lora else None,
                                   "quantization": {"bits": 4} if "qlora" in name else None,
                                   "compile": False},  # the eager factors (auto would compile the ~100M shapes)
                            data={"max_length": length, "packing": "soft"},
                            train={"max_steps": 2, "micro_batch_size": micro,
                                   "cpu_heap_trim_every": 0 if name.endswith("untrimmed") else 5,
                                   "cpu_heap_trim_slack": 0.0})  # trim at every check: the fitted factor
    out = subprocess.run([sys.executable, "-c", MEASURE, "train", str(cfg_path)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    measured_gb = int(out.stdout.split("PEAK_KB")[-1]) * 1024 / 1e9
    cfg = load_config(cfg_path)
    predicted_gb = estimate(model_shape(cfg.model.path), setup_from_config(cfg, None, None))["total"]
    print(json.dumps({"config": name, "predicted_gb": predicted_gb, "measured_gb": measured_gb}))
    assert abs(predicted_gb - measured_gb) / measured_gb <= 0.20, (predicted_gb, measured_gb)
