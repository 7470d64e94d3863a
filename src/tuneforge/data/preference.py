"""Preference pairs: reading `format: preference` records and tokenizing them as pairs.

Owns the pair formats users have (TRL's): `prompt`, `chosen`, `rejected` as strings or as
message lists (`prompt: [messages]`, `chosen: [assistant message(s)]`), and the implicit-prompt
form (no `prompt`: `chosen` and `rejected` are whole conversations sharing a prefix, which
becomes the prompt). `columns:` renames the three fields; `system:` adds a system message.

A pair becomes two conversations, prompt + chosen and prompt + rejected, rendered and
tokenized by the SFT pipeline (`encode_samples`), so the template and loss masks are the
SFT ones: only the answer's assistant tokens count (the prompt's turns never do). Each
sequence is cut at `max_length` tokens (`truncation: right`) the same way; a pair whose
prompt leaves no answer token within `max_length` is dropped and counted, so is a pair whose
members are identical once cut (they differed only past `max_length`: nothing to prefer), and with
`truncation: drop` a pair is dropped when either sequence is too long. The result is an
`Encoded` whose sequences alternate chosen, rejected (sequence 2i and 2i+1 are pair i) and
whose `origin` is the pair's index in its file.
"""

from __future__ import annotations

import numpy as np

from tuneforge.data.records import ROLES, Message, Sample, data_files, iter_json_records
from tuneforge.data.tokenize import Encoded, encode_samples
from tuneforge.errors import DataError

FIELDS = ("prompt", "chosen", "rejected")
UNBOUNDED = 1 << 40  # encode without truncation; pairs are cut here, both members alike


def _messages(value, field: str, where: str, default_role: str) -> list[Message]:
    """A string (one message of `default_role`) or a list of {role, content} messages."""
    if isinstance(value, str):
        return [Message(default_role, value)]
    if not isinstance(value, list) or not value:
        raise DataError(f"field '{field}' must be a string or a non-empty list of messages, got "
                        f"{type(value).__name__ if not isinstance(value, list) else 'an empty list'}", where=where)
    out = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or item.get("role") not in ROLES or not isinstance(item.get("content"), str):
            raise DataError(f"{field}[{i}] must be {{\"role\": system|user|assistant, \"content\": string}}", where=where)
        out.append(Message(item["role"], item["content"]))
    return out


def _split_shared_prefix(chosen: list[Message], rejected: list[Message], where: str):
    """Implicit prompt: the longest common run of leading messages is the prompt."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and (chosen[n].role, chosen[n].content) == (rejected[n].role, rejected[n].content):
        n += 1
    if n == 0:
        raise DataError("no 'prompt' field and 'chosen'/'rejected' share no leading messages", where=where,
                        hint="add a prompt field, or map yours with columns: {prompt: <your field>}")
    return chosen[:n], chosen[n:], rejected[n:]


def parse_pair(record: dict, columns: dict, system: str | None, where: str) -> tuple[Sample, Sample]:
    """(prompt + chosen, prompt + rejected) conversations of one record."""
    keys = {name: columns.get(name, name) for name in FIELDS}
    for name in ("chosen", "rejected"):
        if record.get(keys[name]) is None:
            have = ", ".join(sorted(map(str, record))) or "nothing"
            raise DataError(f"missing field '{keys[name]}' (record has: {have})", where=where,
                            hint=f"map your field with columns: {{{name}: <your field>}}")
    chosen = _messages(record[keys["chosen"]], keys["chosen"], where, "assistant")
    rejected = _messages(record[keys["rejected"]], keys["rejected"], where, "assistant")
    if record.get(keys["prompt"]) is not None:
        prompt = _messages(record[keys["prompt"]], keys["prompt"], where, "user")
    else:
        prompt, chosen, rejected = _split_shared_prefix(chosen, rejected, where)
    if system and prompt[0].role != "system":
        prompt = [Message("system", system)] + prompt
    prompt = [Message(m.role, m.content, loss=False) for m in prompt]  # earlier turns are context only
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not any(m.trained for m in answer):
            raise DataError(f"'{keys[name]}' has no assistant message (nothing to compare)", where=where)
    return Sample(messages=prompt + chosen), Sample(messages=prompt + rejected)


def read_pairs(path, columns: dict | None = None, system: str | None = None) -> list[tuple[Sample, Sample]]:
    """All pairs of one dataset entry, in file order; a bad record raises DataError."""
    pairs = []
    for file in data_files(path):
        for where, record in iter_json_records(file):
            if not isinstance(record, dict):
                raise DataError(f"expected a JSON object per record, got {type(record).__name__}", where=where)
            pairs.append(parse_pair(record, columns or {}, system, where))
    return pairs


def _member(enc: Encoded, pair: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, trained mask) of one member of `pair`, cut at `length`."""
    start = int(enc.offsets[int(np.searchsorted(enc.origin, pair))])
    return enc.tokens[start: start + length], enc.trained[start: start + length]


def encode_pairs(pairs: list[tuple[Sample, Sample]], template, tokenizer, max_length: int, truncation: str,
                 progress=None) -> Encoded:
    """Tokenize both members of every pair; cut, drop and count pairs as the module says."""
    members = [encode_samples([pair[k] for pair in pairs], template, tokenizer, UNBOUNDED, "right",
                              progress=progress) for k in (0, 1)]
    n = len(pairs)
    length = np.zeros((2, n), dtype=np.int64)  # full token count per member (0 = no trained token at all)
    first_target = np.full((2, n), UNBOUNDED, dtype=np.int64)  # position of the first trained target
    for k, enc in enumerate(members):
        lens = np.diff(enc.offsets)
        length[k, enc.origin] = lens
        for i, (a, b) in zip(enc.origin.tolist(), zip(enc.offsets[:-1].tolist(), enc.offsets[1:].tolist())):
            hits = np.flatnonzero(enc.trained[a + 1: b])
            first_target[k, i] = hits[0] + 1 if len(hits) else UNBOUNDED
    no_loss = (length == 0).any(axis=0)
    too_long = (length > max_length).any(axis=0)
    prompt_too_long = (first_target >= max_length).any(axis=0) & ~no_loss
    keep = ~no_loss & ~prompt_too_long & (~too_long if truncation == "drop" else True)
    kept_len = np.minimum(length, max_length)
    identical = np.zeros(n, dtype=bool)  # cut before the members differ: no preference left to learn
    for i in np.flatnonzero(keep & too_long).tolist():
        (c, cm), (r, rm) = (_member(enc, i, kept_len[k, i]) for k, enc in enumerate(members))
        identical[i] = np.array_equal(c, r) and np.array_equal(cm, rm)
    keep &= ~identical
    tokens, trained = [], []
    for i in np.flatnonzero(keep).tolist():
        for k, enc in enumerate(members):
            ids, mask = _member(enc, i, kept_len[k, i])
            tokens.append(ids)
            trained.append(mask)
    sizes = kept_len[:, keep].T.reshape(-1)  # chosen, rejected, chosen, ...
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    counts = {"samples": n, "pairs": int(keep.sum()), "dropped": int((~keep).sum()),
              "truncated": int((keep & too_long).sum()), "too_long": int((~keep & (too_long | prompt_too_long)).sum()),
              "no_loss": int(no_loss.sum()), "identical": int(identical.sum())}
    return Encoded(tokens=np.concatenate(tokens) if tokens else np.zeros(0, np.int32),
                   trained=np.concatenate(trained) if trained else np.zeros(0, bool),
                   offsets=offsets, origin=np.repeat(np.flatnonzero(keep), 2).astype(np.int64), counts=counts)


def pack_pairs(mode: str, order: np.ndarray, lengths: np.ndarray, row_length: int, buffer: int):
    """Rows of whole pairs: `order` holds pair indices (pair p = sequences 2p, 2p+1 with
    `lengths` per sequence); each pair's chosen and rejected stay together in one row."""
    from tuneforge.data.packing import Packs, pack

    pair_len = lengths[0::2] + lengths[1::2]
    units = pack(mode, order, pair_len, row_length, buffer)
    pairs = units.pieces[:, 0]
    pieces = np.zeros((2 * len(pairs), 3), dtype=np.int64)
    pieces[0::2, 0], pieces[1::2, 0] = 2 * pairs, 2 * pairs + 1
    pieces[0::2, 2], pieces[1::2, 2] = lengths[2 * pairs], lengths[2 * pairs + 1]
    return Packs(pieces=pieces, row_offsets=2 * units.row_offsets)
