"""The likelihood metric (`--metric loss`): cross-entropy of the references under the model.

Each record is rendered and tokenized exactly as training does (`encode_samples` with the
run's template: the trained tokens are the assistant answers and their end-of-turn tokens),
one record per row, and the summed CE of its trained tokens is computed with the LM head run
on loss positions only. Per record: mean loss and token count; overall: the token-weighted
mean loss (what training logs as `eval_loss`) and its perplexity. Records that tokenization
drops (no trained token within `max_length`) are counted, never silently lost.
Preference data's reward accuracy (chosen scored above rejected) would sit here beside it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tuneforge.data.collate import IGNORE, collate_rows
from tuneforge.data.templates import get_template
from tuneforge.data.tokenize import encode_samples
from tuneforge.model.attention import model_inputs
from tuneforge.train.loss import decoder_and_head


@torch.no_grad()
def row_losses(model, batch: dict, chunk_size: int = 1024) -> torch.Tensor:
    """Summed CE (float64) of each row's loss tokens in a collated batch."""
    decoder, head = decoder_and_head(model)
    out = decoder(**model_inputs(batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    labels = batch["labels"]
    keep = labels != IGNORE
    rows = keep.nonzero()[:, 0]
    states, targets = hidden[keep], labels[keep]
    softcap = getattr(decoder.config, "final_logit_softcapping", None)
    sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
    for start in range(0, len(targets), chunk_size):
        part = slice(start, start + chunk_size)
        logits = head(states[part]).float()
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        sums.index_add_(0, rows[part], F.cross_entropy(logits, targets[part], reduction="none").double())
    return sums


def likelihood(model, tokenizer, template_name: str, items, max_length: int, batch_size: int = 8,
               progress=None) -> tuple[list[dict | None], dict]:
    """(per item {"loss", "tokens"} or None when dropped, summary {loss, perplexity, tokens, dropped, truncated})."""
    template = get_template(template_name, tokenizer)
    encoded = encode_samples([item.sample for item in items], template, tokenizer, max_length, "right")
    device = next(model.parameters()).device
    per_item: list[dict | None] = [None] * len(items)
    total, count = 0.0, 0
    kept = len(encoded.offsets) - 1
    was_training = model.training
    model.eval()
    try:
        for begin in range(0, kept, batch_size):
            indices = range(begin, min(begin + batch_size, kept))
            rows = [[(encoded.tokens[encoded.offsets[i]: encoded.offsets[i + 1]],
                      encoded.trained[encoded.offsets[i]: encoded.offsets[i + 1]], ("eval", int(encoded.origin[i])))]
                     for i in indices]
            batch = collate_rows(rows, tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            sums = row_losses(model, batch).tolist()
            tokens = (batch["labels"] != IGNORE).sum(dim=1).tolist()
            for i, loss_sum, n in zip(indices, sums, tokens):
                per_item[int(encoded.origin[i])] = {"loss": loss_sum / max(n, 1), "tokens": int(n)}
                total, count = total + loss_sum, count + int(n)
            if progress is not None:
                progress(len(indices))
    finally:
        model.train(was_training)
    if progress is not None and kept < len(items):
        progress(len(items) - kept)  # the dropped records
    mean = total / count if count else float("nan")
    summary = {"loss": mean, "perplexity": math.exp(mean) if count and mean < 700 else None, "loss_tokens": count,
               "dropped": encoded.counts["dropped"], "truncated": encoded.counts["truncated"]}
    return per_item, summary
