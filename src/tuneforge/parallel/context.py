"""The run context the training loop talks to instead of global process-group state.

`LocalContext` is one process on one device. `tuneforge.parallel.distributed.DistributedContext`
offers the same methods (reductions, barriers, model wrapping, gradient clipping) over a
process group, so the loop is the same code for one process and for many. Besides the
methods, a context says where to load the model (`load_device`) and whether the wrapped
model's parameters are sharded over ranks (`sharded`: checkpoints then go through DCP).

The loop's step seams (`prepare`, `backward`, `optimizer_step`, `owns_precision`) are trivial
here and in `DistributedContext`; they exist for `tuneforge.parallel.deepspeed_engine.
DeepSpeedContext`, whose engine needs the optimizer at start and owns backward and the step.
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
    owns_precision = False  # True where an engine (DeepSpeed) casts the model: no autocast, no GradScaler

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

    def prepare(self, trainer, optimizer):
        """(training module, optimizer) as the loop uses them; an engine may wrap both."""
        return trainer, optimizer

    def backward(self, model, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer, scaler) -> None:
        scaler.step(optimizer)
        scaler.update()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        params = [p for p in model.parameters() if p.grad is not None]
        if max_norm and max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
