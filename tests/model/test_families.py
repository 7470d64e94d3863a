"""Model families through transformers: a tiny model of each trains two packed LoRA steps
with varlen attention and exports a merged folder that plain transformers reloads."""

import pytest
import torch
from helpers import alpaca_records, build_tokenizer, write_config, write_jsonl

from tuneforge.cli import main

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256)


def family_config(name, tokenizer):
    import transformers as tf

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    if name == "llama":
        return tf.LlamaConfig(**COMMON, **ids)
    if name == "qwen2":
        return tf.Qwen2Config(**COMMON, **ids)
    if name == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16, **ids)
    if name == "mistral":
        return tf.MistralConfig(**COMMON, **ids)
    if name == "gemma":
        return tf.GemmaConfig(**COMMON, head_dim=16, **ids)
    if name == "mixtral":
        return tf.MixtralConfig(**{**COMMON, "intermediate_size": 64}, num_local_experts=4, num_experts_per_tok=2,
                                output_router_logits=True, router_aux_loss_coef=0.02, **ids)
    raise ValueError(name)


FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "mixtral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_packed_lora_and_exports(tmp_path, family):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model_dir = tmp_path / family
    AutoModelForCausalLM.from_config(family_config(family, tokenizer)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(40))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       model={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}, "attn_implementation": "varlen"},
                       data={"packing": "soft", "max_length": 96},
                       train={"max_steps": 2, "micro_batch_size": 2, "lr": 1e-2})
    assert main(["train", str(cfg)]) == 0
    final = tmp_path / "run" / "final"
    out = tmp_path / "merged"
    assert main(["export", str(final), str(out), "--merge-lora"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), final)
    ids = torch.tensor([[3, 10, 20, 30, 40, 4]])
    with torch.no_grad():
        a, b = merged(ids).logits, adapted(ids).logits
    assert torch.allclose(a, b, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, a, atol=1e-4)  # the adapter did something


def test_moe_loss_includes_the_router_loss_like_the_model():
    from helpers import make_samples, packed_batch
    from transformers import AutoModelForCausalLM

    from tuneforge.model.attention import register_varlen_attention
    from tuneforge.train.loss import lm_loss_sum

    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("mixtral", tokenizer))
    model.set_attn_implementation(register_varlen_attention())
    ids, labels = make_samples((12,), vocab=len(tokenizer), prompt_in=-1)[0]
    reference = model(input_ids=ids[None], labels=labels[None])
    assert reference.aux_loss is not None and reference.aux_loss > 0
    loss_sum, count = lm_loss_sum(model, packed_batch([(ids, labels)], [[0]], 12), chunk_size=4)
    assert torch.allclose(loss_sum / count, reference.loss, atol=1e-5)
    model.config.output_router_logits = False
    plain, _ = lm_loss_sum(model, packed_batch([(ids, labels)], [[0]], 12), chunk_size=4)
    assert not torch.allclose(plain / count, reference.loss, atol=1e-5)
