"""Held-out preference numbers of a model before and after preference tuning (not a test).

    python benchmarks/pref_heldout.py CONFIG [--adapter RUN/final] [key=value ...] [--out FILE.json]

On the pairs the config holds out (`data.eval_split` / `data.eval_datasets`, exactly the rows
training evaluates), with the config's template and max_length, it computes per pair the summed
log-prob of the chosen and of the rejected answer under the base model and, with `--adapter`,
under base + adapter, and reports:
- logp accuracy: the fraction of pairs where log p(chosen) > log p(rejected), and the mean
  margin log p(chosen) - log p(rejected) (the model's own preference, meaningful before tuning);
- with an adapter, DPO's reward accuracy and mean reward margin, rewards being
  beta * (log p_tuned - log p_base) as in training (at the start of DPO they are all zero).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def measure(cfg, adapter: str | None) -> dict:
    from tuneforge.data.collate import collate_rows
    from tuneforge.data.dataset import build_data
    from tuneforge.model.attention import resolve_attn_implementation
    from tuneforge.model.load import load_model, load_tokenizer
    from tuneforge.train.preference import adapters_off, sequence_logps

    tokenizer = load_tokenizer(cfg.model.path)
    data = build_data(cfg, tokenizer, eval_split=True)
    attn = resolve_attn_implementation(cfg.model.attn_implementation, "cpu")
    model = load_model(cfg.model.model_copy(update={"lora": None}), device=torch.device("cpu"), attn_implementation=attn,
                       dtype="float32")
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    base, tuned = [], []
    with torch.no_grad():
        for r in range(len(data)):
            batch = collate_rows([data.row(r)], tokenizer.pad_token_id)
            if adapter:
                tuned.append(sequence_logps(model, batch, cfg.train.loss_chunk_size)[0].double())
                with adapters_off(model):
                    base.append(sequence_logps(model, batch, cfg.train.loss_chunk_size)[0].double())
            else:
                base.append(sequence_logps(model, batch, cfg.train.loss_chunk_size)[0].double())
    out = {"pairs": sum(len(b) for b in base) // 2}

    def preference(logps):
        margin = logps[0::2] - logps[1::2]
        return {"logp_accuracy": float((margin > 0).double().mean()), "logp_margin": float(margin.mean())}

    base = torch.cat(base)
    out["base"] = preference(base)
    if adapter:
        tuned = torch.cat(tuned)
        out["tuned"] = preference(tuned)
        beta = cfg.train.preference.beta
        chosen, rejected = beta * (tuned[0::2] - base[0::2]), beta * (tuned[1::2] - base[1::2])
        out["tuned"].update({"reward_accuracy": float((chosen > rejected).double().mean()),
                             "reward_margin": float((chosen - rejected).mean())})
    return out


def main(argv=None) -> int:
    from tuneforge.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--adapter")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    started = time.time()
    result = {"config": args.config, "adapter": args.adapter, **measure(cfg, args.adapter),
              "seconds": round(time.time() - started, 1)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
