"""train.cpu_heap_trim_every / cpu_heap_trim_slack: glibc's malloc_trim really returns freed
heap to the OS, the trimmer measures the free-but-resident heap and trims only when it exceeds
the slack (on fake readings and on a really fragmented heap), the loop checks after every N-th
decoder block of a CPU forward, and trimming changes no number."""

import subprocess
import sys

import pytest
import torch
from helpers import losses

from tuneforge.cli import main
from tuneforge.train import heap_trim

pytestmark = pytest.mark.skipif(heap_trim.malloc_trim() is None, reason="needs glibc's malloc_trim")

# Kept 64 KB tensors between freed 1 MB ones: the holes stay inside the heap (glibc only gives
# back the top of it) until malloc_trim(0) releases them.
FRAGMENTED_HEAP = """
import ctypes
import torch
from tuneforge.train.heap_trim import malloc_trim
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
# whatever the imports allocated before: 1 MB blocks come from the heap (not mmap), and free()
# never gives back the heap's top by itself
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(M_MMAP_THRESHOLD, 4 * 2**20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
kept, freed = [], []
for _ in range(200):
    freed.append(torch.ones(2**18))    # 1 MB
    kept.append(torch.ones(2**14))     # 64 KB
del freed
before = rss_mb()
released = malloc_trim()()
print(before, rss_mb(), released)
"""


def test_malloc_trim_gives_freed_heap_holes_back():
    out = subprocess.run([sys.executable, "-c", FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after, released = out.stdout.split()
    assert int(released) == 1
    assert float(before) - float(after) > 150, out.stdout  # most of the 200 MB of holes left the process


# HeapTrimmer with the real mallinfo2/statm readings: 1 MB holes between kept 64 KB tensors are
# left alone while they are no more than the slack over the peak in use (they can be reused),
# trimmed once 1.5 MB tensors, which do not fit in them, grow the heap past the budget.
ADAPTIVE = """
import ctypes
import torch
from tuneforge.train.heap_trim import HeapTrimmer, malloc_in_use, malloc_trim
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
libc = ctypes.CDLL("libc.so.6")
assert libc.mallopt(M_MMAP_THRESHOLD, 4 * 2**20) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**30) == 1
malloc_trim()()
trimmer = HeapTrimmer(malloc_trim(), slack=0.25, in_use=malloc_in_use())
kept, freed = [], []
for _ in range(200):
    freed.append(torch.ones(2**18))    # 1 MB
    kept.append(torch.ones(2**14))     # 64 KB
compact = trimmer.check()              # the peak in use: 200 x (1 MB + 64 KB) more than at the start
del freed
reusable = trimmer.check()             # 200 MB of holes, reusable: within the budget
larger = [torch.ones(3 * 2**17) for _ in range(200)]  # 1.5 MB each: a new 300 MB above the holes
fragmented = trimmer.check()
again = trimmer.check()
print(compact, reusable, fragmented, again, trimmer.released // 2**20)
"""


def test_trimmer_trims_only_fragmentation_beyond_the_slack():
    out = subprocess.run([sys.executable, "-c", ADAPTIVE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    compact, reusable, fragmented, again, released = out.stdout.split()
    assert (compact, reusable, fragmented, again) == ("False", "False", "True", "False"), out.stdout
    assert int(released) > 150, out.stdout  # most of the 200 MB of holes went back


def test_trimmer_policy_on_fake_readings():
    """Budget = baseline (resident outside malloc at creation) + (1 + slack) x the peak in use;
    a check trims above it. slack 0, or no way to measure the heap, trims at every check."""
    mb = 2**20
    state = {"rss": 500 * mb, "used": 300 * mb}
    calls = []

    def trim():
        calls.append(1)
        state["rss"] = state["used"] + 200 * mb  # everything free went back; the baseline stays
        return 1

    trimmer = heap_trim.HeapTrimmer(trim, slack=0.5, in_use=lambda: state["used"], rss=lambda: state["rss"])
    assert trimmer.baseline == 200 * mb and trimmer.budget() == 200 * mb  # nothing checked yet
    state.update(used=1000 * mb, rss=1200 * mb)
    assert trimmer.check() is False and trimmer.budget() == 1700 * mb
    state.update(used=400 * mb, rss=1700 * mb)  # 600 MB freed: reusable, within the budget
    assert trimmer.check() is False and not calls
    state["rss"] += mb
    assert trimmer.check() is True and len(calls) == 1
    assert (trimmer.checks, trimmer.trims, trimmer.released, trimmer.peak_in_use) == (3, 1, 1101 * mb, 1000 * mb)
    assert heap_trim.HeapTrimmer(trim, slack=0.0, in_use=lambda: state["used"], rss=lambda: state["rss"]).check()
    blind = heap_trim.HeapTrimmer(trim, slack=0.5, in_use=None, rss=lambda: state["rss"])
    assert blind.budget() is None and blind.check() and len(calls) == 3


def test_hooks_after_every_nth_block(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = []
    monkeypatch.setattr(heap_trim, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    for every, hooks in ((0, 0), (1, 6), (2, 3), (4, 1), (7, 0)):
        model = LlamaForCausalLM(config)
        calls.clear()
        trimmer = heap_trim.trim_heap_during_forward(model, every, slack=0.0)
        assert (trimmer is None) == (hooks == 0)
        calls.clear()  # the one trim before the baseline is taken
        model(torch.arange(10)[None])
        assert len(calls) == hooks, every
        assert trimmer is None or (trimmer.checks, trimmer.trims) == (hooks, hooks)


def test_trimming_changes_no_loss(run_config, tmp_path, monkeypatch):
    """The loop passes train.cpu_heap_trim_every and _slack on: off, every block at slack 0, and
    a slack so large that only the one trim before the baseline happens; the losses agree."""
    calls = []
    real = heap_trim.malloc_trim()
    monkeypatch.setattr(heap_trim, "malloc_trim", lambda: lambda: calls.append(1) or real())
    curves, counts = {}, {}
    for name, every, slack in (("off", 0, 0.0), ("always", 1, 0.0), ("never_needed", 1, 100.0)):
        calls.clear()
        cfg = run_config(name, train={"micro_batch_size": 2, "max_steps": 3, "cpu_heap_trim_every": every,
                                      "cpu_heap_trim_slack": slack},
                         model={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, data={"packing": "soft"})
        assert main(["train", str(cfg)]) == 0
        curves[name], counts[name] = losses(tmp_path / name), len(calls)
    assert counts["off"] == 0
    assert counts["always"] >= 1 + 3 * 2  # the loop hooked both blocks of the tiny model: at least 3 forwards
    assert counts["never_needed"] == 1  # the trim before the baseline is taken
    assert curves["always"] == curves["off"] == curves["never_needed"]
