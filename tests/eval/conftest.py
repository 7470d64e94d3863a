"""A tiny Llama with spread-out logits (greedy decoding has no near-ties) and the test tokenizer."""

import pytest
import torch


@pytest.fixture(scope="session")
def eval_model_dir(tmp_path_factory, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=256,
                      initializer_range=0.2, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    path = tmp_path_factory.mktemp("eval_model")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def eval_model(eval_model_dir):
    from tuneforge.model.source import load_for_inference, resolve_source

    return load_for_inference(resolve_source(eval_model_dir), device="cpu")
