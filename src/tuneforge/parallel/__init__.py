"""Parallelism: launching processes, the run context, and (later) FSDP/DeepSpeed/TP/SP."""
