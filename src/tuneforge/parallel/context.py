"""The run context the training loop talks to instead of global process-group state.

`LocalContext` is one process on one device. `tuneforge.parallel.distributed.DistributedContext`
offers the same methods (reductions, barriers, model wrapping, gradient clipping) over a
process group, so the loop is the same code for one process and for many. Besides the
methods, a context says where to load the model (`load_device`) and whether the wrapped
model's parameters are sharded over ranks (`sharded`: checkpoints then go through DCP).
"""

from __future__ import annotations

import contextlib

import torch


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class LocalContext:
    """One process, one device: every collective is the identity."""

    is_main = True
    rank = 0
    world_size = 1
    dp_rank = 0
    dp_size = 1
    sharded = False

    def __init__(self, device: torch.device | None = None):
        self.device = device or default_device()
        self.load_device = self.device

    def main_first(self, fn):
        return fn()

    def barrier(self) -> None:
        pass

    def all_reduce_sum(self, value):
        return value

    def all_gather_object(self, obj) -> list:
        return [obj]

    def wrap_model(self, model):
        return model

    def no_sync(self, model, last: bool):
        return contextlib.nullcontext()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
