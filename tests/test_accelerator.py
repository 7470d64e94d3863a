"""The CUDA-only seams on the CPU: memory counters say None, the rest does nothing."""

import torch

from tuneforge import accelerator


def test_cpu_has_no_accelerator_memory_and_the_no_ops_run():
    cpu = torch.device("cpu")
    assert accelerator.peak_memory_gb(cpu) is None
    accelerator.reset_peak_memory(cpu)
    accelerator.synchronize(cpu)
    accelerator.release_cached_memory("cpu")
    if not torch.cuda.is_available():  # a CUDA device name without CUDA: still no counters, no error
        assert accelerator.peak_memory_gb("cuda") is None
        accelerator.reset_peak_memory("cuda")
