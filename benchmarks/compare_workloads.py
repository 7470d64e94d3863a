"""The benchmark's workloads and its `prepare` phase (see compare.py): tokenize once with
tuneforge, replay tuneforge's seeded row sampler, and write the samples every system trains on.

Workloads (`--workload`):
  gsm8k   GSM8K (`question`/`answer`), rows of 1,024 tokens; samples of similar lengths, so the
          HF Trainer gets each tuneforge row's samples as one padded batch (`hf_batching: rows`).
  alpaca  5,000 Alpaca samples (`instruction`/`input`/`output`; long-tailed lengths), rows of
          2,048 tokens; the HF Trainer gets the same samples shuffled into batches of 8 padded
          to the longest (`hf_batching: random`), what users run without packing.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from bench_flops import executed_flops, model_dims, useful_flops

IGNORE = -100
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
WORKLOADS = {
    "gsm8k": {"data": str(DATA / "gsm8k_train.jsonl"), "columns": {"instruction": "question", "output": "answer"},
              "max_length": 1024, "hf_batching": "rows"},
    "alpaca": {"data": str(DATA / "alpaca_5000.json"), "columns": {}, "max_length": 2048, "hf_batching": "random"},
}
HF_BATCH = 8  # samples per padded HF batch with hf_batching "random"


def tuneforge_config(spec: dict) -> dict:
    """The tuneforge config of the benchmark (JSON is YAML)."""
    return {
        "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "varlen",
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "data": {"datasets": [{"path": spec["data"], "format": "alpaca", "columns": spec["columns"]}],
                 "template": spec["template"], "max_length": spec["max_length"], "packing": "soft",
                 "sampler": "random", "cache_dir": str(Path(spec["work"]) / "data_cache")},
        "train": {"micro_batch_size": 1, "gradient_accumulation": 1, "max_steps": spec["steps"], "lr": spec["lr"],
                  "weight_decay": 0.0, "warmup_ratio": spec["warmup_ratio"], "lr_scheduler": "cosine",
                  "max_grad_norm": 1.0, "seed": spec["seed"], "save_every": 0, "log_every": 1,
                  "work_dir": str(Path(spec["work"]) / "tuneforge_run")},
        "parallel": {"strategy": "single"},
    }


def phase_prepare(spec_path: Path) -> None:
    import numpy as np

    from tuneforge.config import load_config
    from tuneforge.data.dataset import build_data
    from tuneforge.data.records import read_samples
    from tuneforge.data.samplers import RowSampler
    from tuneforge.model.load import load_tokenizer

    spec = json.loads(spec_path.read_text())
    config_path = Path(spec["work"]) / "tuneforge.yaml"
    config_path.write_text(json.dumps(tuneforge_config(spec), indent=1))
    cfg = load_config(str(config_path))
    tokenizer = load_tokenizer(cfg.model.path)
    started = time.time()
    data = build_data(cfg, tokenizer)
    build_s = time.time() - started
    # tuneforge's loop: RowSampler(lengths, sampler, rank 0, world 1, seed=train.seed, batch=micro*accum), take(1) per step
    sampler = RowSampler(data.lengths, cfg.data.sampler, rank=0, world=1, seed=cfg.train.seed, batch_per_rank=1)
    samples = read_samples(spec["data"], "alpaca", spec["columns"])

    def examples_of(row: int) -> list[dict]:
        out = []
        for ids, trained, (_, origin) in data.row(row):
            ids = np.asarray(ids, dtype=np.int64)
            labels = np.where(np.asarray(trained, dtype=bool), ids, IGNORE)
            labels[0] = IGNORE  # the first token of a sample is never a target (tuneforge never trains it)
            out.append({"input_ids": ids.tolist(), "labels": labels.tolist(), "origin": int(origin)})
        return out

    steps = []
    for _ in range(spec["steps"]):
        rows = sampler.take(1)
        if rows is None:
            raise SystemExit("more --steps than packed rows in one epoch")
        steps.append(examples_of(int(rows[0])))
    held_out = []
    while len(held_out) < spec["eval_samples"]:
        rows = sampler.take(1)
        if rows is None:
            break
        held_out.extend(examples_of(int(rows[0])))
    held_out = held_out[: spec["eval_samples"]]

    # With the tokenizer's own template the ids must be exactly apply_chat_template's
    checked = 0
    if spec["template"] == "tokenizer":
        for ex in [e for s in steps for e in s] + held_out:
            messages = [{"role": m.role, "content": m.content} for m in samples[ex["origin"]].messages]
            ref = tokenizer.apply_chat_template(messages, tokenize=True)
            ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
            if list(ref)[: spec["max_length"]] != ex["input_ids"]:
                raise SystemExit(f"sample {ex['origin']}: tuneforge ids differ from apply_chat_template")
            checked += 1
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = steps[0][0]
    trained_ids = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE]
    per_step = step_stats(steps)
    hf_steps = steps
    if spec["hf_batching"] == "random":  # the same samples, shuffled into padded batches of HF_BATCH
        flat = [e for s in steps for e in s]
        random.Random(spec["seed"]).shuffle(flat)
        hf_steps = [flat[i: i + HF_BATCH] for i in range(0, len(flat), HF_BATCH)]
    dims = model_dims(spec["model"])
    flops = {"useful": useful_flops(dims, 16, steps)}
    flops.update({system: executed_flops(dims, 16, steps, system) for system in ("tuneforge", "trl")})
    flops["hf"] = executed_flops(dims, 16, hf_steps, "hf")
    (Path(spec["work"]) / "examples.json").write_text(json.dumps({"steps": steps, "hf_steps": hf_steps,
                                                                 "held_out": held_out}))
    (Path(spec["work"]) / "prepare.json").write_text(json.dumps({
        "hf_per_step": step_stats(hf_steps), "flops": flops, "model_dims": dims,
        "config": str(config_path), "build_data_s": build_s, "rows_per_epoch": len(data),
        "packing_efficiency": data.report["packing_efficiency"], "per_step": per_step,
        "held_out_samples": len(held_out), "held_out_tokens": sum(len(e["input_ids"]) for e in held_out),
        "apply_chat_template_checked": checked,
        "loss_mask_ends_with_im_end": bool(trained_ids and trained_ids[-1] == end_id),
        "first_sample_trained_text_tail": tokenizer.decode(trained_ids[-12:]),
    }))




def step_stats(steps: list[list[dict]]) -> list[dict]:
    """Samples, real tokens, loss tokens and padded tokens (batch x longest) of each step."""
    return [{"samples": len(s), "tokens": sum(len(e["input_ids"]) for e in s),
             "loss_tokens": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in s),
             "padded_tokens": len(s) * max(len(e["input_ids"]) for e in s)} for s in steps]
