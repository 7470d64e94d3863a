"""Generation metrics: batched greedy answers to each item's prompt, scored by a metric.

Prompts are built with the same template code as training (`tuneforge.generate.prompt_ids`),
decoded greedily in batches with the KV cache (`generate_batch`: left padding, stop at the
end-of-turn token), and each answer goes through a `Scorer`. Used by `tuneforge eval` and by
`train.eval_metric` during training.
"""

from __future__ import annotations

import time

from tuneforge.eval.metrics import Scorer
from tuneforge.eval.stats import wilson_interval
from tuneforge.generate import generate_batch, prompt_ids, stop_token_ids


def generate_and_score(model, tokenizer, template_name: str, items, scorer: Scorer, max_new_tokens: int,
                       batch_size: int = 8, progress=None) -> tuple[list[dict], dict]:
    """(one record per item: prompt, reference, generation, extracted, expected, correct, new_tokens;
    summary: n, correct, accuracy, ci95, generated_tokens, seconds, tokens_per_s, samples_per_s)."""
    prompts = [prompt_ids(tokenizer, template_name, item.prompt) for item in items]
    stops = stop_token_ids(tokenizer, template_name)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    started = time.perf_counter()
    outputs = generate_batch(model, prompts, stops, pad, max_new_tokens, batch_size=batch_size, progress=progress)
    seconds = time.perf_counter() - started
    records = []
    for item, tokens in zip(items, outputs):
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        extracted, expected, correct = scorer.score(text, item.reference)
        records.append({"index": item.index, "prompt": item.prompt[-1].content, "reference": item.reference,
                        "generation": text, "extracted": extracted, "expected": expected, "correct": bool(correct),
                        "new_tokens": len(tokens)})
    right = sum(r["correct"] for r in records)
    generated = sum(r["new_tokens"] for r in records)
    low, high = wilson_interval(right, len(records))
    summary = {"n": len(records), "correct": right, "accuracy": right / len(records) if records else None,
               "ci95": [low, high], "generated_tokens": generated, "seconds": seconds,
               "tokens_per_s": generated / seconds if seconds > 0 else None,
               "samples_per_s": len(records) / seconds if seconds > 0 else None}
    return records, summary
