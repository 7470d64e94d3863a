"""Batched greedy generation (left padding, KV cache, stop tokens) equals one-by-one `generate`."""

import torch

from tuneforge.data.records import Message
from tuneforge.generate import generate_batch, generate_reply, prompt_ids, stop_token_ids

QUESTIONS = ["the fox", "What is two plus three? Tell me step by step, please.", "abc", "Natalia sold clips to 48 of her friends",
             "x y z", "hello there, lazy dog", "12 + 7 = ?"]
MAX_NEW = 12


def _alone(model, prompt, stops, pad):
    """Reference: `model.generate` on one unpadded prompt, cut at the first stop token."""
    ids = torch.tensor([prompt])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_NEW, do_sample=False,
                         temperature=None, top_p=None, top_k=None, eos_token_id=stops, pad_token_id=pad)
    new = out[0, len(prompt):].tolist()
    return next((new[:i] for i, t in enumerate(new) if t in stops), new)


def test_batched_generation_equals_one_by_one(eval_model):
    model, tokenizer = eval_model
    prompts = [prompt_ids(tokenizer, "chatml", [Message("user", q)]) for q in QUESTIONS]
    stops = stop_token_ids(tokenizer, "chatml")
    pad = tokenizer.pad_token_id
    # add a token the model emits mid-answer for some prompts as a stop, so rows end at different steps
    free = [_alone(model, p, stops, pad) for p in prompts]
    counts = {}
    for tokens in free:
        for t in set(tokens[2:8]):
            counts[t] = counts.get(t, 0) + 1
    extra = next(t for t, c in sorted(counts.items(), key=lambda kv: -kv[1]) if c < len(prompts))
    stops = stops + [extra]
    reference = [_alone(model, p, stops, pad) for p in prompts]
    lengths = [len(r) for r in reference]
    assert min(lengths) < MAX_NEW and max(lengths) == MAX_NEW  # some rows stopped early, others ran out
    assert len({len(p) for p in prompts}) > 3  # real left padding

    batched = generate_batch(model, prompts, stops, pad, MAX_NEW, batch_size=3)  # 3 + 3 + 1 rows
    assert batched == reference
    assert generate_batch(model, prompts, stops, pad, MAX_NEW, batch_size=8) == reference


def test_generate_reply_agrees_with_batch(eval_model):
    model, tokenizer = eval_model
    messages = [Message("user", QUESTIONS[1])]
    stops = stop_token_ids(tokenizer, "chatml")
    [tokens] = generate_batch(model, [prompt_ids(tokenizer, "chatml", messages)], stops, tokenizer.pad_token_id, MAX_NEW)
    assert generate_reply(model, tokenizer, "chatml", messages, max_new_tokens=MAX_NEW) == tokenizer.decode(tokens)
