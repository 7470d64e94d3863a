"""Which rows each data-parallel rank trains on, in which order, and where to resume.

Owns `data.sampler`: `random` (a seeded permutation, new each epoch), `sequential`, and
`length_grouped` (XTuner's LengthGroupedSampler: per epoch a seeded permutation cut into
mega-batches of `min(N // (4·B·W), 50)·B·W` rows, each sorted by length, longest first,
with the longest row of all moved to the very front). Every epoch's global order is padded
to a multiple of the data-parallel size W and rank r takes positions r, r+W, r+2W, ... so
that each optimizer step covers one contiguous block of the global order whatever W is.

A sampler takes its data-parallel rank and size explicitly (ranks of one sequence/tensor
parallel group pass the same values) and saves `epoch` and `position` in `state_dict()`.
"""

from __future__ import annotations

import numpy as np


def length_grouped_order(lengths: np.ndarray, group: int, rng: np.random.Generator) -> np.ndarray:
    """XTuner's length-grouped indices for one epoch; `group` = per-device batch × W."""
    n = len(lengths)
    order = rng.permutation(n)
    mult = max(min(n // (group * 4), 50), 1)
    size = mult * group
    megabatches = [order[i: i + size] for i in range(0, n, size)]
    megabatches = [mb[np.argsort(-lengths[mb], kind="stable")] for mb in megabatches]
    heads = [lengths[mb[0]] for mb in megabatches]
    top = int(np.argmax(heads))
    first, best = megabatches[0], megabatches[top]
    first[0], best[0] = best[0], first[0]
    return np.concatenate(megabatches)


class RowSampler:
    """Per-rank row order for `data.sampler`, resumable at any micro-batch."""

    def __init__(self, lengths: np.ndarray, kind: str, *, rank: int, world: int, seed: int,
                 batch_per_rank: int = 1):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside data-parallel size {world}")
        self.lengths = np.asarray(lengths)
        self.kind = kind
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_per_rank = batch_per_rank  # per-device micro batch x accumulation (length_grouped)
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, np.ndarray] | None = None

    def global_order(self, epoch: int) -> np.ndarray:
        n = len(self.lengths)
        if self.kind == "sequential":
            order = np.arange(n)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            if self.kind == "random":
                order = rng.permutation(n)
            elif self.kind == "length_grouped":
                order = length_grouped_order(self.lengths, self.batch_per_rank * self.world, rng)
            else:
                raise ValueError(f"unknown sampler {self.kind!r}")
        total = -(-n // self.world) * self.world
        if total > n:  # pad by wrapping around, like DistributedSampler
            order = np.concatenate([order, order[: total - n]])
        return order

    def rank_order(self, epoch: int | None = None) -> np.ndarray:
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.global_order(epoch)[self.rank:: self.world])
        return self._cache[1]

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.world)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def take(self, count: int) -> np.ndarray | None:
        """The next `count` rows of this rank in the current epoch, or None at its end."""
        order = self.rank_order()
        if self.position + count > len(order):
            return None
        rows = order[self.position: self.position + count]
        self.position += count
        return rows

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "kind": self.kind,
                "world": self.world, "rows": len(self.lengths)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("rows") != len(self.lengths):
            raise ValueError(f"the checkpoint's data has {state.get('rows')} rows, this run's has {len(self.lengths)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._cache = None
