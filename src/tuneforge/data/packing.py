"""Packing samples into rows of at most `max_length` tokens.

Owns the three layouts of `data.packing`:
- `soft`: whole samples, best-fit decreasing over a bounded buffer of samples (memory does
  not grow with the dataset), never cutting a sample;
- `hard`: the samples concatenated and cut at exactly `max_length` (InternEvo/XTuner
  `pack_to_max_length`); the pieces become separate sequences;
- `none`: one sample per row.
A layout is `Packs`: row r holds the sequence pieces `pieces[row_offsets[r]:row_offsets[r+1]]`,
each piece `(sample, start, end)`, i.e. tokens[offsets[sample] + start : offsets[sample] + end].
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np


@dataclass
class Packs:
    pieces: np.ndarray  # int64 (M, 3): sample index, start, end (token positions in the sample)
    row_offsets: np.ndarray  # int64 (P + 1,)

    def __len__(self) -> int:
        return len(self.row_offsets) - 1

    def row_lengths(self) -> np.ndarray:
        """Tokens in each row."""
        sizes = self.pieces[:, 2] - self.pieces[:, 1]
        sums = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=sums[1:])
        return sums[self.row_offsets[1:]] - sums[self.row_offsets[:-1]]


def _from_rows(rows: list[list[tuple[int, int, int]]]) -> Packs:
    sizes = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    flat = [piece for row in rows for piece in row]
    pieces = np.asarray(flat, dtype=np.int64).reshape(-1, 3)
    return Packs(pieces=pieces, row_offsets=offsets)


def pack_none(order: np.ndarray, lengths: np.ndarray) -> Packs:
    """One sample per row, in `order`."""
    pieces = np.stack([order, np.zeros_like(order), lengths[order]], axis=1).astype(np.int64)
    return Packs(pieces=pieces.reshape(-1, 3), row_offsets=np.arange(len(order) + 1, dtype=np.int64))


def pack_soft(order: np.ndarray, lengths: np.ndarray, max_length: int, buffer: int = 8192) -> Packs:
    """Best-fit decreasing over consecutive buffers of `buffer` samples taken in `order`.

    Each sample goes into the open row whose free space is the smallest that still fits
    it; rows are emitted at the end of every buffer, so memory stays bounded.
    """
    rows: list[list[tuple[int, int, int]]] = []
    for begin in range(0, len(order), buffer):
        chunk = order[begin: begin + buffer]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        free: list[tuple[int, int]] = []  # sorted (free space, row id)
        bins: list[list[tuple[int, int, int]]] = []
        for sample in chunk.tolist():
            size = int(lengths[sample])
            at = bisect.bisect_left(free, (size, -1))
            if at < len(free):
                space, row = free.pop(at)
            else:
                space, row = max_length, len(bins)
                bins.append([])
            bins[row].append((sample, 0, size))
            if space - size > 0:
                bisect.insort(free, (space - size, row))
        rows.extend(bins)
    return _from_rows(rows)


def pack_hard(order: np.ndarray, lengths: np.ndarray, max_length: int) -> Packs:
    """Concatenate samples in `order` and cut every `max_length` tokens."""
    rows: list[list[tuple[int, int, int]]] = []
    row: list[tuple[int, int, int]] = []
    room = max_length
    for sample in order.tolist():
        start, size = 0, int(lengths[sample])
        while start < size:
            take = min(room, size - start)
            row.append((sample, start, start + take))
            start += take
            room -= take
            if room == 0:
                rows.append(row)
                row, room = [], max_length
    if row:
        rows.append(row)
    return _from_rows(rows)


def mixed_order(dataset_of_sample: np.ndarray, weights: list[float], seed: int) -> np.ndarray:
    """Sample indices for one epoch: each dataset repeated by its weight, then shuffled.

    A weight of 2.5 gives two full copies of the dataset plus a seeded random half.
    """
    rng = np.random.default_rng(seed)
    chosen = []
    for index, weight in enumerate(weights):
        members = np.flatnonzero(dataset_of_sample == index)
        whole, part = int(weight), weight - int(weight)
        chosen.extend([members] * whole)
        extra = int(round(part * len(members)))
        if extra:
            chosen.append(np.sort(rng.choice(members, size=extra, replace=False)))
    order = np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)
    return rng.permutation(order)


def pack(mode: str, order: np.ndarray, lengths: np.ndarray, max_length: int, buffer: int) -> Packs:
    if mode == "soft":
        return pack_soft(order, lengths, max_length, buffer)
    if mode == "hard":
        return pack_hard(order, lengths, max_length)
    return pack_none(order, lengths)
