"""Generating replies with the same chat template code that training uses.

Owns prompt building (a conversation rendered with `data.template` plus the generation
prompt), the stop tokens (the template's end-of-turn and EOS), and greedy/sampled decoding
through `model.generate` with a standard attention implementation (varlen attention is for
training on packed rows; decoding with a KV cache uses SDPA). `generate_batch` decodes many
prompts greedily at once: left-padded rows with an attention mask (positions follow the
mask, so each row decodes as it would alone), one KV cache, every row cut at its first
end-of-turn token.
"""

from __future__ import annotations

import contextlib

import torch

from tuneforge.data.records import Message
from tuneforge.data.templates import get_template


def prompt_text(tokenizer, template_name: str, messages: list[Message]) -> str:
    """`messages` rendered with the template, ending with the generation prompt."""
    template = get_template(template_name, tokenizer)
    return "".join(piece for piece, _ in template.render(messages, tokenizer, add_generation_prompt=True))


def prompt_ids(tokenizer, template_name: str, messages: list[Message]) -> list[int]:
    """The prompt's token ids, equal to the start of the training ids of the same conversation.

    A generation prompt ending in spaces (`llama2_chat`'s "[/INST] ") is cut before them when the
    tokenizer merges them into the next word: training saw " answer" as one token, so the
    model must be the one to produce it.
    """
    text = prompt_text(tokenizer, template_name, messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if text.endswith(" ") and tokenizer(text + "a", add_special_tokens=False)["input_ids"][: len(ids)] != ids:
        ids = tokenizer(text.rstrip(" "), add_special_tokens=False)["input_ids"]
    return ids


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


def _until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in stops:
            return tokens[:index]
    return tokens


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], stop_ids: list[int], pad_id: int, max_new_tokens: int,
                   batch_size: int = 8, progress=None) -> list[list[int]]:
    """Greedy continuations (token ids, end-of-turn excluded) of each prompt in `prompts`.

    Prompts are batched by length (less padding) and answered in their own order; each row's
    result equals greedy decoding of that prompt alone. `progress(n)` is called per batch.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    stops = set(stop_ids)
    was_training = model.training
    model.eval()
    try:
        with decoding_attention(model):
            for begin in range(0, len(order), batch_size):
                chunk = order[begin: begin + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, i in enumerate(chunk):
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                     max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None,
                                     top_k=None, eos_token_id=stop_ids, pad_token_id=pad_id)
                for row, i in enumerate(chunk):
                    results[i] = _until_stop(out[row, width:].tolist(), stops)
                if progress is not None:
                    progress(len(chunk))
    finally:
        model.train(was_training)
    return results


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
    new = _until_stop(out[0, len(ids):].tolist(), set(stop_token_ids(tokenizer, template_name)))
    return tokenizer.decode(new, skip_special_tokens=False)
