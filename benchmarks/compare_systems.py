"""The benchmark's child runs (see compare.py): one system trains the prepared samples and
reports its steps, tokens/s, peak RSS and (first round) the held-out loss.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

IGNORE = -100


def lr_lambda(spec: dict, total_steps: int):
    """tuneforge's schedule (warmup ceil(ratio*steps), linear from lr/warmup, then cosine to 0)."""
    import math

    from tuneforge.train.optim import lr_factor

    warmup = int(math.ceil(spec["warmup_ratio"] * total_steps))
    return lambda step: lr_factor(step, total_steps, warmup, "cosine", 0.0)


def lora_config():
    import peft

    return peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                           task_type=peft.TaskType.CAUSAL_LM)


def load_base(spec: dict):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32, attn_implementation="sdpa")


def held_out_loss(model, examples: list[dict]) -> float:
    """Mean CE over the loss tokens of `examples`, each run alone (no padding): the same code for all."""
    import torch
    import torch.nn.functional as F

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ex in examples:
            ids = torch.tensor([ex["input_ids"]])
            labels = torch.tensor(ex["labels"])
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            total += float(F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum"))
            count += int((labels[1:] != IGNORE).sum())
    return total / max(count, 1)


def peak_rss_mb() -> float:
    from tuneforge.train.rankstats import peak_rss_bytes

    return peak_rss_bytes() / 2**20  # VmHWM: ru_maxrss would include the parent's RSS at fork


def step_record_callback(steps: list, token_log: list):
    """A TrainerCallback recording (wall time, real tokens, padded tokens, loss tokens) per optimizer step."""
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            real, padded, loss_tokens = (sum(x) for x in zip(*token_log)) if token_log else (0, 0, 0)
            token_log.clear()
            steps.append({"step": state.global_step, "t": time.time(), "tokens": real, "padded_tokens": padded,
                          "loss_tokens": loss_tokens})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs and steps:
                steps[-1]["loss"] = float(logs["loss"])

    return Record()


def counting_trainer(base):
    """`base` (Trainer or SFTTrainer) counting the real/padded/loss tokens of each training batch
    and using tuneforge's lr schedule."""
    import torch

    class Counting(base):
        def training_step(self, model, inputs, *args, **kwargs):
            if "attention_mask" in inputs:
                real = int(inputs["attention_mask"].sum())
            else:  # padding-free: one flattened row, no padding (pad_to_multiple_of is None)
                real = int(inputs["input_ids"].numel())
            self.token_log.append((real, int(inputs["input_ids"].numel()), int((inputs["labels"] != IGNORE).sum())))
            return super().training_step(model, inputs, *args, **kwargs)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, lr_lambda(self.bench_spec, num_training_steps))
            return self.lr_scheduler

    return Counting


def trainer_args(cls, spec: dict, out_dir: Path, **extra):
    return cls(output_dir=str(out_dir), per_device_train_batch_size=1, gradient_accumulation_steps=1,
               max_steps=extra.pop("max_steps", -1), num_train_epochs=1, learning_rate=spec["lr"], weight_decay=0.0,
               adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, optim="adamw_torch", max_grad_norm=1.0,
               logging_steps=1, save_strategy="no", report_to="none", seed=spec["seed"], use_cpu=True,
               dataloader_num_workers=0, disable_tqdm=True, bf16=False, fp16=False,
               gradient_checkpointing=False,  # SFTConfig defaults to True; tuneforge and HF Trainer run without
               **extra)


def summarize_steps(steps: list[dict], warmup: int = 1, warmup_tokens: int | None = None) -> dict:
    """Totals of the recorded steps; tokens/s over the steps after the first `warmup` ones, or,
    with `warmup_tokens` (batches other than the packed rows), after the fewest first steps
    holding at least that many real tokens."""
    if warmup_tokens is not None:
        seen, warmup = 0, 0
        while warmup < len(steps) - 1 and seen < warmup_tokens:
            seen += steps[warmup]["tokens"]
            warmup += 1
        warmup = max(warmup, 1)
    after = steps[warmup:]
    span = steps[-1]["t"] - steps[warmup - 1]["t"] if len(steps) > warmup else float("nan")
    tokens_after = sum(s["tokens"] for s in after)
    losses = [s.get("loss") for s in steps]
    weights = [s["loss_tokens"] for s in steps]
    mean_loss = (sum(l * w for l, w in zip(losses, weights)) / sum(weights)) if None not in losses and sum(weights) else None
    return {"steps": len(steps), "tokens": sum(s["tokens"] for s in steps),
            "padded_tokens": sum(s.get("padded_tokens", s["tokens"]) for s in steps),
            "loss_tokens": sum(weights), "tokens_per_s": tokens_after / span if span > 0 else None,
            "first_step_done": steps[0]["t"], "train_loss_mean": mean_loss, "losses": losses,
            "step_tokens": [s["tokens"] for s in steps]}


# --------------------------------------------------------------------------------------------
# phase: one system's run
# --------------------------------------------------------------------------------------------

def run_tuneforge_eager(spec: dict, examples: dict, out_dir: Path) -> dict:
    """tuneforge with `model.compile=false` (the defaults compile this model's blocks on the CPU)."""
    return run_tuneforge(spec, examples, out_dir, overrides=["model.compile=false"])


def run_tuneforge(spec: dict, examples: dict, out_dir: Path, overrides: tuple | list = ()) -> dict:
    import tuneforge.train.metrics as tf_metrics
    from tuneforge.cli import main as tuneforge_main

    stamps: list[float] = []
    original = tf_metrics.MetricsLog.write

    def write(self, row):  # benchmark hook: the wall time each step's metrics row is written
        if "loss" in row and "step" in row:
            stamps.append(time.time())
        return original(self, row)

    tf_metrics.MetricsLog.write = write
    cache = out_dir / "compile_cache"  # the benchmark's own folder, emptied: every run compiles as a first run does
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    work_dir = out_dir / "run"
    code = tuneforge_main(["train", spec["config"], *overrides, "--work-dir", str(work_dir), "--force"])
    if code != 0:
        raise SystemExit(f"tuneforge train exited {code}")
    rss = peak_rss_mb()
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    previous, steps = 0, []
    for row, t in zip(rows, stamps):
        steps.append({"step": row["step"], "t": t, "tokens": row["tokens"] - previous, "loss_tokens": row["loss_tokens"],
                      "loss": row["loss"]})
        previous = row["tokens"]
    result = {**summarize_steps(steps, spec["warmup"]), "peak_rss_mb": rss}
    if spec.get("evaluate"):
        from peft import PeftModel

        started = time.time()
        model = PeftModel.from_pretrained(load_base(spec), str(work_dir / "final"))
        result["held_out_loss"] = held_out_loss(model, examples["held_out"])
        result["eval_s"] = time.time() - started
    return result


def run_trl(spec: dict, examples: dict, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    flat = [e for step in examples["steps"] for e in step]
    dataset = Dataset.from_dict({"input_ids": [e["input_ids"] for e in flat], "labels": [e["labels"] for e in flat]})
    torch.manual_seed(spec["seed"])
    model = load_base(spec)
    args = trainer_args(SFTConfig, spec, out_dir, max_length=spec["max_length"], packing=True,
                        packing_strategy="bfd", padding_free=True, dataset_num_proc=None)
    steps, token_log = [], []
    cls = counting_trainer(SFTTrainer)
    trainer = cls(model=model, args=args, train_dataset=dataset, processing_class=load_tokenizer_hf(spec),
                  peft_config=lora_config(), callbacks=[step_record_callback(steps, token_log)])
    trainer.token_log, trainer.bench_spec = token_log, spec
    trainer.train()
    rss = peak_rss_mb()
    result = {**summarize_steps(steps, spec["warmup"]), "peak_rss_mb": rss, "packed_rows": len(trainer.train_dataset),
              "attn_implementation": trainer.model.config._attn_implementation,
              "collator_keys": sorted(trainer.data_collator([trainer.train_dataset[0]]).keys())}
    if spec.get("evaluate"):
        started = time.time()
        result["cross_sample_check"] = cross_sample_check(trainer)
        result["held_out_loss"] = held_out_loss(trainer.model, examples["held_out"])
        result["eval_s"] = time.time() - started
    return result


def cross_sample_check(trainer) -> dict:
    """Does TRL's padding-free batch keep packed samples apart? Packed logits vs each sample alone.

    The packed call passes use_cache=False, as SFTTrainer.compute_loss does: transformers detects the
    packed rows from position_ids only without a cache (with the config's use_cache=True the samples
    of a row attend to each other; checked on transformers 5.23: max |dlogit| ~40).
    """
    import torch

    model = trainer.model
    model.eval()
    row = trainer.train_dataset[0]
    batch = trainer.data_collator([row])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        diffs, start = [], 0
        for n in row["seq_lengths"]:
            alone = model(input_ids=batch["input_ids"][:, start: start + n], use_cache=False).logits[0]
            diffs.append(float((packed[start: start + n] - alone).abs().max()))
            start += n
    model.train()
    return {"samples_in_row": len(row["seq_lengths"]), "max_abs_logit_diff": max(diffs),
            "isolated": max(diffs) < 1e-3}


def load_tokenizer_hf(spec: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model"])
    tokenizer.padding_side = "right"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class GroupDataset:
    """One item per optimizer step: the samples of one batch."""

    def __init__(self, steps):
        self.steps = steps

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, index):
        return {"group": [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in self.steps[index]]}


def run_hf(spec: dict, examples: dict, out_dir: Path) -> dict:
    import peft
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = load_tokenizer_hf(spec)
    pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE, return_tensors="pt")

    def collate(items):
        return pad([e for item in items for e in item["group"]])

    torch.manual_seed(spec["seed"])
    model = peft.get_peft_model(load_base(spec), lora_config())
    batches = examples["hf_steps"]  # tuneforge's rows, or the same samples in random batches of 8
    args = trainer_args(TrainingArguments, spec, out_dir, max_steps=len(batches),
                        train_sampling_strategy="sequential", remove_unused_columns=False)
    steps, token_log = [], []
    cls = counting_trainer(Trainer)
    trainer = cls(model=model, args=args, train_dataset=GroupDataset(batches), data_collator=collate,
                  callbacks=[step_record_callback(steps, token_log)])
    trainer.token_log, trainer.bench_spec = token_log, spec
    trainer.train()
    rss = peak_rss_mb()
    same_rows = batches == examples["steps"]
    result = {**summarize_steps(steps, spec["warmup"], None if same_rows else spec["warmup_tokens"]), "peak_rss_mb": rss}
    if spec.get("evaluate"):
        started = time.time()
        result["held_out_loss"] = held_out_loss(trainer.model, examples["held_out"])
        result["eval_s"] = time.time() - started
    return result
