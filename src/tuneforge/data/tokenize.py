"""Tokenizing rendered samples into token ids and a per-token "trained" mask.

Owns: batched fast-tokenizer encoding of whole rendered samples (so ids equal what
`apply_chat_template` produces), mapping trained character spans to tokens through the
offset mapping, and truncation (`right` keeps a sample if a trained token survives, `drop`
drops over-long samples). Results are flat numpy arrays, ready to be memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from tuneforge.data.records import Sample
from tuneforge.data.templates import Segments, render_sample


@dataclass
class Encoded:
    """Flat token storage: sample i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray  # int32
    trained: np.ndarray  # bool: token is a target the model must learn
    offsets: np.ndarray  # int64, N + 1
    origin: np.ndarray  # int64: index of the sample in its dataset
    counts: dict = field(default_factory=dict)  # samples, dropped, truncated, no_loss


def trained_token_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """True for every token whose character span overlaps a trained span."""
    if not spans or len(offsets) == 0:
        return np.zeros(len(offsets), dtype=bool)
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)
    starts, ends = offsets[:, 0], offsets[:, 1]
    idx = np.searchsorted(bounds, starts, side="right")
    inside = (idx % 2) == 1
    # a token starting in a gap but reaching into the next trained span also overlaps it
    nxt = np.minimum(idx, len(bounds) - 1)
    reaches = ((idx % 2) == 0) & (idx < len(bounds)) & (ends > bounds[nxt])
    return inside | reaches


def _spans(segments: Segments) -> tuple[str, list[tuple[int, int]]]:
    text, spans, cursor = [], [], 0
    for piece, trained in segments:
        if trained:
            if spans and spans[-1][1] == cursor:
                spans[-1] = (spans[-1][0], cursor + len(piece))
            else:
                spans.append((cursor, cursor + len(piece)))
        text.append(piece)
        cursor += len(piece)
    return "".join(text), spans


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of plain text by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def encode_samples(samples: list[Sample], template, tokenizer, max_length: int, truncation: str,
                   batch_size: int = 1024, progress=None) -> Encoded:
    """Render, tokenize and mask `samples`; drop/truncate as configured and count it."""
    bos_for_text = adds_bos(tokenizer)
    pieces_tokens, pieces_mask, lengths, origin = [], [], [], []
    counts = {"samples": len(samples), "dropped": 0, "truncated": 0, "no_loss": 0, "too_long": 0}
    for begin in range(0, len(samples), batch_size):
        chunk = samples[begin: begin + batch_size]
        rendered = [_spans(render_sample(s, template, tokenizer, bos_for_text)) for s in chunk]
        enc = tokenizer([text for text, _ in rendered], add_special_tokens=False,
                        return_offsets_mapping=True, return_attention_mask=False)
        for j, ((_, spans), ids, offs) in enumerate(zip(rendered, enc["input_ids"], enc["offset_mapping"])):
            ids = np.asarray(ids, dtype=np.int32)
            mask = trained_token_mask(np.asarray(offs, dtype=np.int64).reshape(-1, 2), spans)
            if len(ids) > max_length:
                if truncation == "drop":
                    counts["dropped"] += 1
                    counts["too_long"] += 1
                    continue
                ids, mask = ids[:max_length], mask[:max_length]
                if not mask[1:].any():
                    counts["dropped"] += 1
                    counts["too_long"] += 1
                    continue
                counts["truncated"] += 1
            if not mask[1:].any():
                counts["dropped"] += 1
                counts["no_loss"] += 1
                continue
            mask[0] = False  # the first token is never predicted
            pieces_tokens.append(ids)
            pieces_mask.append(mask)
            lengths.append(len(ids))
            origin.append(begin + j)
        if progress is not None:
            progress(len(chunk))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        tokens=np.concatenate(pieces_tokens) if pieces_tokens else np.zeros(0, np.int32),
        trained=np.concatenate(pieces_mask) if pieces_mask else np.zeros(0, bool),
        offsets=offsets,
        origin=np.asarray(origin, dtype=np.int64),
        counts=counts,
    )
