"""train.cpu_heap_trim_every: glibc's malloc_trim really returns freed heap to the OS, the
loop calls it after every N-th decoder block of a CPU forward, and it changes no number."""

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


def test_hooks_after_every_nth_block(monkeypatch):
    from transformers import LlamaConfig, LlamaForCausalLM

    calls = []
    monkeypatch.setattr(heap_trim, "malloc_trim", lambda: lambda: calls.append(1) or 1)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2)
    for every, hooks in ((0, 0), (1, 6), (2, 3), (4, 1), (7, 0)):
        model = LlamaForCausalLM(config)
        calls.clear()
        assert heap_trim.trim_heap_during_forward(model, every) == hooks
        model(torch.arange(10)[None])
        assert len(calls) == hooks, every


def test_trimming_changes_no_loss(run_config, tmp_path, monkeypatch):
    calls = []
    real = heap_trim.malloc_trim()
    monkeypatch.setattr(heap_trim, "malloc_trim", lambda: lambda: calls.append(1) or real())
    curves = {}
    for every in (0, 1):
        cfg = run_config(f"every{every}", train={"micro_batch_size": 2, "max_steps": 3, "cpu_heap_trim_every": every},
                         model={"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}, data={"packing": "soft"})
        assert main(["train", str(cfg)]) == 0
        curves[every] = losses(tmp_path / f"every{every}")
        if every == 0:
            assert not calls
    assert len(calls) >= 3 * 2  # the loop hooked both blocks of the tiny model: at least 3 forwards
    assert curves[1] == curves[0]
