"""Turning packed rows into model-ready batches.

Owns the batch contract every model path consumes:
- `input_ids`, `labels`, `position_ids`: LongTensor [B, T];
- `labels` are already shifted, per sequence piece: labels[b, t] is the target of position t,
  -100 where nothing is learned; the last token of one sample never predicts the first
  token of the next;
- `position_ids` restart at 0 for every piece (padding at a row's end is its own piece);
- `cu_seqlens` (int32) are the piece boundaries over the flattened B*T tokens and
  `max_seqlen` the longest piece, for varlen attention;
- `num_loss_tokens` counts labels != -100; `sample_ids` names the samples in the batch.
"""

from __future__ import annotations

import numpy as np

IGNORE = -100


def collate_rows(rows: list[list], pad_id: int, pad_to_multiple: int = 1, length: int | None = None) -> dict:
    """Batch `rows` (each a list of (ids, trained, sample_id) pieces) into one padded batch."""
    import torch

    row_len = [sum(len(ids) for ids, _, _ in row) for row in rows]
    width = length or max(row_len)
    width = -(-width // pad_to_multiple) * pad_to_multiple
    batch = len(rows)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    labels = np.full((batch, width), IGNORE, dtype=np.int64)
    positions = np.zeros((batch, width), dtype=np.int64)
    seqlens: list[int] = []
    sample_ids = []
    for b, row in enumerate(rows):
        cursor = 0
        for ids, trained, sample_id in row:
            n = len(ids)
            input_ids[b, cursor: cursor + n] = ids
            target = np.where(trained[1:], ids[1:], IGNORE)
            labels[b, cursor: cursor + n - 1] = target
            positions[b, cursor: cursor + n] = np.arange(n)
            seqlens.append(n)
            sample_ids.append(sample_id)
            cursor += n
        if cursor < width:
            positions[b, cursor:] = np.arange(width - cursor)
            seqlens.append(width - cursor)
    cu = np.zeros(len(seqlens) + 1, dtype=np.int32)
    np.cumsum(seqlens, out=cu[1:])
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.from_numpy(positions),
        "cu_seqlens": torch.from_numpy(cu),
        "max_seqlen": int(max(seqlens)),
        "num_loss_tokens": int((labels != IGNORE).sum()),
        "num_tokens": int(sum(row_len)),
        "sample_ids": sample_ids,
    }
