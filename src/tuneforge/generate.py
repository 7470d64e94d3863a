"""Generating replies with the same chat template code that training uses.

Owns prompt building (a conversation rendered with `data.template` plus the generation
prompt), the stop tokens (the template's end-of-turn and EOS), and greedy/sampled decoding
through `model.generate` with a standard attention implementation (varlen attention is for
training on packed rows; decoding with a KV cache uses SDPA).
"""

from __future__ import annotations

import contextlib

import torch

from tuneforge.data.records import Message
from tuneforge.data.templates import get_template


def prompt_ids(tokenizer, template_name: str, messages: list[Message]) -> list[int]:
    template = get_template(template_name, tokenizer)
    text = "".join(piece for piece, _ in template.render(messages, tokenizer, add_generation_prompt=True))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def stop_token_ids(tokenizer, template_name: str) -> list[int]:
    template = get_template(template_name, tokenizer)
    ids = set()
    for text in template.stop_strings(tokenizer):
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.add(encoded[0])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


@contextlib.contextmanager
def decoding_attention(model):
    """Use SDPA while generating; restore the training attention afterwards."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = getattr(base.config, "_attn_implementation", None)
    switch = before not in (None, "sdpa", "eager", "flash_attention_2") and hasattr(base, "set_attn_implementation")
    if switch:
        base.set_attn_implementation("sdpa")
    try:
        yield
    finally:
        if switch:
            base.set_attn_implementation(before)


@torch.no_grad()
def generate_reply(model, tokenizer, template_name: str, messages: list[Message], max_new_tokens: int = 128,
                   temperature: float = 0.0) -> str:
    """The model's reply to `messages`, stopping at the end-of-turn token."""
    ids = prompt_ids(tokenizer, template_name, messages)
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], device=device)
    was_training = model.training
    model.eval()
    try:
        with decoding_attention(model):
            out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                 temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                                 eos_token_id=stop_token_ids(tokenizer, template_name),
                                 pad_token_id=tokenizer.pad_token_id)
    finally:
        model.train(was_training)
    new = out[0, len(ids):].tolist()
    stops = set(stop_token_ids(tokenizer, template_name))
    while new and new[-1] in stops:
        new.pop()
    return tokenizer.decode(new, skip_special_tokens=False)
