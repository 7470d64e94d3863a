"""Where one training step's time goes: torch.profiler over a tuneforge forward + backward.

    python benchmarks/profile_step.py CONFIG.yaml [--steps 3] [--rows 20] [--out FILE.txt]

Loads the config's model (with LoRA when configured) and data exactly as `tuneforge train`
does, runs `--steps` warm-up steps (forward, backward, AdamW), then profiles one more
forward + backward on the CPU and prints the operators by self CPU time, with the peak RSS.
`benchmarks/compare.py --work DIR` leaves the benchmark's config in DIR/tuneforge.yaml.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from tuneforge.config import load_config
from tuneforge.data.collate import collate_rows
from tuneforge.data.dataset import build_data
from tuneforge.model.attention import resolve_attn_implementation
from tuneforge.model.load import load_model, load_tokenizer
from tuneforge.model.lora import apply_lora
from tuneforge.train.loss import CausalLMLoss
from tuneforge.train.rankstats import peak_rss_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--steps", type=int, default=3, help="warm-up steps before the profiled one")
    parser.add_argument("--rows", type=int, default=20, help="operators to list")
    parser.add_argument("--out", help="also write the table here")
    args = parser.parse_args()

    cfg = load_config(args.config)
    tokenizer = load_tokenizer(cfg.model.path)
    data = build_data(cfg, tokenizer)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, "cpu")
    model = load_model(cfg.model, device=torch.device("cpu"), attn_implementation=attn, dtype="float32")
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora)
    trainer = CausalLMLoss(model, cfg.train.loss_chunk_size)
    optimizer = torch.optim.AdamW([p for p in trainer.parameters() if p.requires_grad], lr=cfg.train.lr)
    for row in range(args.steps):
        batch = collate_rows([data.row(row)], tokenizer.pad_token_id)
        started = time.time()
        (trainer(batch) / batch["num_loss_tokens"]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"warm-up step {row + 1}: {batch['num_tokens']} tokens in {time.time() - started:.2f}s", flush=True)
    batch = collate_rows([data.row(args.steps)], tokenizer.pad_token_id)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        (trainer(batch) / batch["num_loss_tokens"]).backward()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    summary = (f"profiled: forward + backward of one row, {batch['num_tokens']} tokens "
               f"({batch['num_loss_tokens']} loss tokens); peak RSS {peak_rss_bytes() / 2**20:.0f} MB")
    print(table)
    print(summary)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(table + "\n" + summary + "\n")


if __name__ == "__main__":
    main()
