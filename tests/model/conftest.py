"""Tiny models and tokenizers built locally for the model tests (nothing is downloaded)."""

from __future__ import annotations

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2+3? It is 5.",
    "Fine-tuning a language model needs data, a loss and patience.",
    "hello world, hello tokenizer, hello model",
] * 20


def make_tokenizer():
    """A byte-level BPE fast tokenizer (about 300 tokens) with a ChatML template, no pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


def make_model(vocab_size: int, *, tie: bool = False, seed: int = 0):
    """A 2-layer Llama (hidden 64, GQA 4/2 heads) in float32 with visibly non-zero logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        initializer_range=0.1,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved HF folder (safetensors + tokenizer) of a tiny untied Llama; treat as read-only."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    make_model(len(tiny_tokenizer)).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def sample_ids(tiny_tokenizer):
    return tiny_tokenizer("hello world, the quick brown fox", return_tensors="pt")["input_ids"]


@pytest.fixture(scope="session")
def tiny_model():
    """The `make_model(vocab_size, tie=False, seed=0)` builder."""
    return make_model


@pytest.fixture(scope="session")
def logits_of():
    """`logits_of(model, ids)`: float32 logits without grad."""
    return logits
