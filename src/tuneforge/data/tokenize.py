"""Tokenizing rendered samples into token ids and a per-token "trained" mask.

Owns: batched fast-tokenizer encoding of whole rendered samples (so ids equal what
`apply_chat_template` produces), mapping trained character spans to tokens through the
offset mapping, and truncation (`right` keeps a sample if a trained token survives, `drop`
drops over-long samples); texts far beyond max_length are cut before tokenizing (`TextCutter`). Results are flat numpy arrays, ready to be memory-mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from concurrent.futures import ThreadPoolExecutor
from itertools import chain

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


def _start_encoding(tokenizer, texts: list[str], pool):
    """Begin tokenizing `texts`; returns a thunk giving the encodings.

    The Rust tokenizer releases the GIL and uses every core, so it runs in `pool` while
    the caller renders the next batch and masks the previous one.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        future = pool.submit(backend.encode_batch, texts, add_special_tokens=False)

        def result():
            encodings = future.result()
            return [e.ids for e in encodings], [e.offsets for e in encodings]

        return result
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return lambda: (enc["input_ids"], enc["offset_mapping"])


def _flatten(ids_lists, offset_lists) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids int32, offsets int64 (n, 2), per-text token counts), flat over the batch."""
    counts = np.fromiter(map(len, ids_lists), dtype=np.int64, count=len(ids_lists))
    total = int(counts.sum())
    ids = np.fromiter(chain.from_iterable(ids_lists), dtype=np.int32, count=total)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(offset_lists)), dtype=np.int64, count=2 * total)
    return ids, offsets.reshape(-1, 2), counts


CUT_FACTOR = 4  # a text is cut at CUT_FACTOR x max_length x the longest token's characters


def longest_token_chars(tokenizer) -> int:
    """The most characters any vocabulary entry spells (byte-level entries: one per byte)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.get_vocab(with_added_tokens=True) if backend is not None else tokenizer.get_vocab()
    return max(map(len, vocab), default=1)


class TextCutter:
    """Cuts a rendered text far beyond `max_length` before it is tokenized, so time and memory
    stay bounded by max_length (one 50 MB record would otherwise be tokenized whole to keep
    a few hundred tokens).

    No token covers more characters than the longest vocabulary entry spells (`L`), so the
    first `max_length` tokens of a text lie within its first `max_length x L` characters. The
    cut is at `CUT_FACTOR` times that (also a margin for a normalizer that would join
    characters), leaving the tokenizer's word splitting and merges at the cut far from every
    token that is kept: the kept tokens, and their trained mask, are those
    of the whole text (tests/data/test_data_reliability.py checks this). A cut text still has
    more than `max_length` tokens, so the sample is counted as truncated (or dropped) as before.
    """

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer, self.max_length, self.limit = tokenizer, max_length, None

    def __call__(self, text: str, spans: list[tuple[int, int]]) -> tuple[str, list[tuple[int, int]]]:
        if len(text) <= CUT_FACTOR * self.max_length:  # no entry spells fewer than 1 character: nothing to cut
            return text, spans
        if self.limit is None:
            self.limit = CUT_FACTOR * self.max_length * longest_token_chars(self.tokenizer)
        if len(text) <= self.limit:
            return text, spans
        return text[: self.limit], [(a, min(b, self.limit)) for a, b in spans if a < self.limit]


def encode_samples(samples: list[Sample], template, tokenizer, max_length: int, truncation: str,
                   batch_size: int = 2048, progress=None, cut_long_texts: bool = True) -> Encoded:
    """Render, tokenize and mask `samples`; drop/truncate as configured and count it.

    Work is vectorised per batch: the texts are tokenized together, and trained spans are
    matched to tokens on character positions made global over the batch. Texts far beyond
    `max_length` are cut first (`TextCutter`; `cut_long_texts=False` tokenizes them whole).
    """
    bos_for_text = adds_bos(tokenizer)
    cut = TextCutter(tokenizer, max_length) if cut_long_texts else (lambda text, spans: (text, spans))
    parts_tokens, parts_mask, parts_len, parts_origin = [], [], [], []
    counts = {"samples": len(samples), "dropped": 0, "truncated": 0, "no_loss": 0, "too_long": 0}

    def finish(begin, rendered, encodings):
        ids, offsets, lens = _flatten(*encodings())
        # global character positions: sample j's text starts at char_base[j]
        char_base = np.zeros(len(rendered), dtype=np.int64)
        np.cumsum([len(text) for text, _ in rendered[:-1]], out=char_base[1:])
        spans = [(a + base, b + base) for (_, sample_spans), base in zip(rendered, char_base.tolist())
                 for a, b in sample_spans]
        trained = trained_token_mask(offsets + np.repeat(char_base, lens)[:, None], spans)
        starts = np.zeros(len(rendered), dtype=np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        position = np.arange(len(ids)) - np.repeat(starts, lens)
        trained &= position > 0  # the first token of a sample is never predicted
        too_long = lens > max_length
        keep_sample = lens > 1
        if truncation == "drop":
            keep_sample &= ~too_long
        kept_len = np.minimum(lens, max_length)
        in_row = position < np.repeat(kept_len, lens)
        loss_count = np.bincount(np.repeat(np.arange(len(rendered)), lens), weights=trained & in_row,
                                 minlength=len(rendered))
        no_loss = keep_sample & (loss_count == 0)
        counts["too_long"] += int((too_long & (~keep_sample | no_loss)).sum()) if truncation == "right" else int(too_long.sum())
        counts["no_loss"] += int((no_loss & ~too_long).sum()) + int((lens <= 1).sum())
        keep_sample &= loss_count > 0
        counts["dropped"] += int((~keep_sample).sum())
        counts["truncated"] += int((keep_sample & too_long).sum())
        keep_token = in_row & np.repeat(keep_sample, lens)
        parts_tokens.append(ids[keep_token])
        parts_mask.append(trained[keep_token])
        parts_len.append(kept_len[keep_sample])
        parts_origin.append(begin + np.flatnonzero(keep_sample))
        if progress is not None:
            progress(len(rendered))

    pending = None
    with ThreadPoolExecutor(max_workers=1) as pool:
        for begin in range(0, len(samples), batch_size):
            rendered = [cut(*_spans(render_sample(s, template, tokenizer, bos_for_text)))
                        for s in samples[begin: begin + batch_size]]
            started = (begin, rendered, _start_encoding(tokenizer, [text for text, _ in rendered], pool))
            if pending is not None:
                finish(*pending)
            pending = started
        if pending is not None:
            finish(*pending)
    lengths = np.concatenate(parts_len) if parts_len else np.zeros(0, np.int64)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        tokens=np.concatenate(parts_tokens) if parts_tokens else np.zeros(0, np.int32),
        trained=np.concatenate(parts_mask) if parts_mask else np.zeros(0, bool),
        offsets=offsets,
        origin=np.concatenate(parts_origin).astype(np.int64) if parts_origin else np.zeros(0, np.int64),
        counts=counts,
    )
