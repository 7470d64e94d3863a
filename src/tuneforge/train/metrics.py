"""What a run reports: `metrics.jsonl`, the progress bar, FLOPs/MFU, optional TensorBoard.

`metrics.jsonl` gets one JSON object per optimizer step (`step, loss, lr, grad_norm, tokens,
loss_tokens, tokens_per_s, elapsed_s`, plus `mfu` and `peak_mem_gb` where known) and one per
evaluation (`eval_loss`, `samples`). On resume, rows after the resumed step are dropped so
the file reads like one uninterrupted run. TensorBoard events go to `tensorboard/`, one
file per run or resume, named so that name order is creation order.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

# dense bf16 peak FLOP/s of common accelerators, by a substring of the device name
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40": 181e12,
              "4090": 165e12, "A10": 125e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def model_flop_shape(config) -> dict:
    """The numbers the FLOP count needs, read from a transformers config."""
    text = getattr(config, "text_config", None) or config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return {"layers": text.num_hidden_layers, "heads": heads, "head_dim": head_dim,
            "vocab": text.vocab_size, "hidden": hidden}


def training_flops(shape: dict, matmul_params: int, tokens: int, loss_tokens: int, sum_sq_seqlens: int) -> float:
    """FLOPs of one forward+backward (3 x forward) over a batch.

    forward = 2 * (non-embedding matmul parameters) per token
            + 2 * hidden * vocab per loss token (the LM head runs on loss tokens only)
            + attention scores and values: 2 matmuls * 2 FLOPs * heads * head_dim per
              (query, key) pair, causal so L*(L+1)/2 pairs per sequence, per layer.
    Grouped-query attention is counted right because K/V projections are in the parameter
    count and the score matmuls use the query head count; packed (varlen) rows count each
    sequence's own L^2, not the row's.
    """
    dense = 2 * matmul_params * tokens
    head = 2 * shape["hidden"] * shape["vocab"] * loss_tokens
    attention = 4 * shape["heads"] * shape["head_dim"] * shape["layers"] * sum_sq_seqlens
    return 3.0 * (dense + head + attention)


def matmul_parameter_count(model) -> int:
    """Parameters of the decoder's matmuls: everything but embeddings, norms and the LM head."""
    import torch

    total = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    skip = head_ids | ({id(p) for p in embed.parameters()} if embed is not None else set())
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Linear4bit", "Linear8bitLt"):
            for p in module.parameters(recurse=False):
                if id(p) not in skip and p.ndim == 2:
                    total += p.numel()
        elif type(module).__name__.endswith("Experts") or "expert" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                if id(p) not in skip and p.ndim >= 2:
                    total += p.numel()
    return total


class MetricsLog:
    """Appends rows to `metrics.jsonl` (and TensorBoard when installed and wanted)."""

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: int | None = None):
        self.path = Path(work_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            keep = [json.dumps(row) for row in _parse_rows(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            tmp.replace(self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard hides the earlier run's events from the resumed step on
                purge = resume_step + 1 if resume_step is not None else None
                folder = Path(work_dir) / "tensorboard"
                wait_for_a_later_events_name(folder)
                self.writer = SummaryWriter(str(folder), purge_step=purge)
            except ImportError:
                self.writer = None

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, row.get("step", 0))
            self.writer.flush()  # once per logged step: a run that stops on an error keeps its events

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


EVENTS_SECOND = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def wait_for_a_later_events_name(folder: Path, max_wait_s: float = 2.0) -> None:
    """Wait until a new events file's name sorts after every file already in `folder`.

    TensorBoard reads a folder's events files in name order, and a resumed run's purge only
    works when its file comes after the earlier run's. The name starts with the second of
    its creation and continues with the host, pid and a per-process counter, so two runs in
    the same second sort by pid or by counter (`.10` before `.9`), not by age. Waiting for
    the next second (at most once per run, and only when a run started within the same
    second, as tests do) makes the name order the creation order. A file dated in the
    future (a clock set back) is not waited for longer than `max_wait_s`.
    """
    seconds = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*") if (m := EVENTS_SECOND.match(p.name))]
    if not seconds:
        return
    deadline = time.monotonic() + max_wait_s
    while int(time.time()) <= max(seconds) and time.monotonic() < deadline:
        time.sleep(0.02)


def _parse_rows(path: Path) -> list[dict]:
    """Rows of a metrics file; a line torn by a crash mid-write is skipped."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return _parse_rows(path) if path.exists() else []
