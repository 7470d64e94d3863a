"""Per-rank step statistics of a data-parallel run, to spot a slow rank.

Each rank times its steps and its own forward passes (`ForwardTimer`: CUDA events on a GPU, so the time is
the device's and not the launch queue's; the wall clock on the CPU) and counts its tokens. At
log steps `gather_rank_stats` collects them with the rank's peak memory from every rank (a
collective: all ranks call it at the same steps) into metrics columns, and names a rank whose
forward time exceeds 1.5x the median, for the progress line.

Forward time is the rank's own work under DDP (its forward has no collectives); under FSDP it
includes waiting for parameter all-gathers, so a straggler shows less there.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch

SLOW_FACTOR = 1.5


class ForwardTimer:
    """A context manager adding the time of each `with` block to `seconds()`; `reset()` per step."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._wall = 0.0
        self._events: list = []

    def __enter__(self):
        if self.cuda:
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            self._events[-1][1].record()
        else:
            self._wall += time.perf_counter() - self._start

    def seconds(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return sum(start.elapsed_time(end) for start, end in self._events) / 1000.0
        return self._wall


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated by torch, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def peak_rss_bytes() -> int:
    """This process's peak resident set size in bytes.

    Linux: VmHWM of /proc/self/status, the high-water mark of this process's own memory.
    (`ru_maxrss` is not: across fork + exec it keeps the parent's RSS at fork time, so a child
    started from a large process reports the parent's size.) Elsewhere: `ru_maxrss`.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss if sys.platform == "darwin" else rss * 1024


def slow_rank_note(per_rank_s: list[float], factor: float = SLOW_FACTOR) -> str | None:
    """'rank 3 1.8x' when one rank's time exceeds `factor` x the median of all ranks, else None."""
    if len(per_rank_s) < 2:
        return None
    median = statistics.median(per_rank_s)
    slowest = max(range(len(per_rank_s)), key=per_rank_s.__getitem__)
    if median <= 0 or per_rank_s[slowest] <= factor * median:
        return None
    return f"rank {slowest} {per_rank_s[slowest] / median:.1f}x"


def gather_rank_stats(ctx, forward_s: float, step_s: float, tokens: int, device: torch.device) -> dict:
    """Collective: {rank_forward_s, rank_step_s, rank_tokens, rank_peak_mem_gb: one value per
    rank; slow_rank: `slow_rank_note` of the forward times}."""
    stats = ctx.all_gather_object((round(forward_s, 4), round(step_s, 4), int(tokens), round(peak_memory_gb(device), 3)))
    forward, step, tokens_, memory = (list(column) for column in zip(*stats))
    return {"rank_forward_s": forward, "rank_step_s": step, "rank_tokens": tokens_, "rank_peak_mem_gb": memory,
            "slow_rank": slow_rank_note(forward)}
