"""The process group of one job, as a `DistContext` object (no module-level state).

Owns `init_distributed` (env:// rendezvous from a `LaunchEnv`, nccl on GPUs, gloo on the
CPU, a heartbeat to name a rank that stops), `DistContext` (barrier, close, lost-peer
errors) and `long_barrier`, for waits that may last far longer than the collective timeout
(rank 0 building a data cache while the others wait).

torch is imported inside functions only: the CLI imports this module and must start fast.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tuneforge.errors import UserError
from tuneforge.parallel.launch_env import LaunchEnv, apply_env


# --------------------------------------------------------------------------- process group


@dataclass(eq=False)
class DistContext:
    """A handle on this process's process group (or on none, for one process without a launcher)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: Any  # torch.device
    backend: str | None  # "nccl" | "gloo" | None when no group was created
    store: Any = field(default=None, repr=False)  # the rendezvous store, prefixed per job attempt
    closed: bool = field(default=False, repr=False)
    long_barriers: int = field(default=0, repr=False)
    heartbeat: Any = field(default=None, repr=False)  # a heartbeat.Heartbeat, to name a rank that stops
    timeout_s: float = 1800.0  # the process-group timeout

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return self.backend is not None and not self.closed

    def barrier(self) -> None:
        if self.initialized:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if self.initialized:
            import torch.distributed as dist

            if self.heartbeat is not None:
                self.heartbeat.stop()
            if dist.is_initialized():
                dist.destroy_process_group()
        self.closed = True

    def lost_peer_error(self, exc: BaseException):
        """A `heartbeat.LostPeerError` naming the ranks that stopped, when `exc` is a failed
        collective or store call in a job; None otherwise (a bug to show as is)."""
        from tuneforge.parallel.heartbeat import looks_like_lost_peer, lost_peer_error

        if self.world_size == 1 or self.backend is None or not looks_like_lost_peer(exc):
            return None
        return lost_peer_error(exc, self.heartbeat, self.rank, self.timeout_s)

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def init_distributed(env: LaunchEnv, timeout_s: float = 1800.0) -> DistContext:
    """Create the process group for `env` and return its `DistContext`.

    Backend nccl when CUDA is available (device cuda:local_rank), else gloo on the CPU. The
    rendezvous is env://: `env` is first written to os.environ with `apply_env`, so `env` is
    the single source of truth. Launcher "none" gets a context that never creates a group.
    """
    import torch

    if env.launcher == "none":
        if env.world_size != 1:
            raise UserError(f"world size {env.world_size} needs a launcher", hint="use --launcher pytorch, slurm or mpi")
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistContext(0, 1, 0, 1, device, None)

    import torch.distributed as dist

    if not dist.is_available():
        raise UserError("this torch build has no torch.distributed support")
    if dist.is_initialized():
        raise RuntimeError("a process group already exists; close() the previous DistContext first")
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if env.local_rank >= visible:
            raise UserError(f"local rank {env.local_rank} has no GPU: only {visible} visible",
                            hint="start at most one process per GPU on each node")
        backend, device = "nccl", torch.device("cuda", env.local_rank)
        torch.cuda.set_device(device)
    else:
        backend, device = "gloo", torch.device("cpu")

    apply_env(env, os.environ)
    timeout = timedelta(seconds=timeout_s)
    try:
        # What init_process_group(init_method="env://") does inside, kept here so that
        # long_barrier can use the store without torch's private _get_default_store().
        store, _, _ = next(dist.rendezvous("env://", rank=env.rank, world_size=env.world_size, timeout=timeout))
        store.set_timeout(timeout)
        dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=env.rank,
                                world_size=env.world_size, timeout=timeout,
                                device_id=device if backend == "nccl" else None)
    except dist.DistError as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"rank {env.rank} could not join the process group at {env.master_addr}:{env.master_port}: {first_line}",
                        hint="check MASTER_ADDR/MASTER_PORT, that every rank started, and that the port is not in use") from exc
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # torchrun restarts reuse the agent's store
    from tuneforge.parallel.heartbeat import Heartbeat

    heartbeat = Heartbeat(env.master_addr, env.master_port, env.rank, env.world_size,
                          prefix=f"tuneforge/attempt{attempt}/").start()
    return DistContext(env.rank, env.world_size, env.local_rank, env.local_world_size, device, backend,
                       store=dist.PrefixStore(f"tuneforge/attempt{attempt}", store), heartbeat=heartbeat,
                       timeout_s=timeout_s)


def long_barrier(ctx: DistContext, poll_s: float = 5.0, *,
                 on_wait: Callable[[int, float], None] | None = None) -> None:
    """A barrier that never times out, for waits of unbounded length (rank 0 builds a cache).

    Each rank adds 1 to a counter key in the rendezvous store, then polls it every `poll_s`
    seconds until all ranks arrived; `on_wait(arrived, waited_s)` is called after each poll
    (for progress logs). Why not `dist.barrier()` on a gloo side group with a 1-day timeout:
    that is still a timeout; `new_group` is itself a collective that every rank must reach
    before the slow work starts; a blocking C++ barrier does not run Python signal handlers,
    so Ctrl-C is ignored until it returns; and under NCCL a long-pending collective trips the
    watchdog. Each store poll is a tiny request answered at once, so no collective timeout
    applies, Ctrl-C works between polls, and a dead store host makes the next poll raise
    instead of hanging. The cost is up to `poll_s` of extra latency.
    """
    if ctx.world_size == 1 or ctx.backend is None:
        return
    if ctx.closed:
        raise RuntimeError("long_barrier on a closed DistContext")
    ctx.long_barriers += 1
    key = f"long_barrier/{ctx.long_barriers}"
    arrived = ctx.store.add(key, 1)
    start = time.monotonic()
    while arrived < ctx.world_size:
        time.sleep(poll_s)
        arrived = ctx.store.add(key, 0)
        if on_wait is not None:
            on_wait(arrived, time.monotonic() - start)
