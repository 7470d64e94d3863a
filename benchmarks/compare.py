"""tuneforge vs TRL SFTTrainer (packing) vs HF Trainer (padded batches): LoRA SFT side by side.

    python benchmarks/compare.py [--model .cache/smollm2-135m-instruct] [--steps 8] [--warmup 3] [--repeats 3]
    python benchmarks/compare.py --steps 2 --warmup 1 --repeats 1 --max-length 256 --systems tuneforge,hf  # smoke

One workload for all three systems: the same model, LoRA (r=16, alpha=32, dropout 0, all linear
layers, fp32), learning-rate schedule (warmup + cosine, AdamW, clip 1.0), sequence length and the
very same token ids and loss masks. The parent tokenizes GSM8K ONCE with tuneforge's pipeline
(`prepare` phase), replays tuneforge's seeded row sampler to learn which packed rows (= which
samples) its `--steps` optimizer steps will train on, and hands exactly those samples to the
others:
  tuneforge  `tuneforge train` (soft packing + varlen attention + chunked CE), one packed row
             of `--max-length` tokens per step;
  tuneforge_compile  the same with `model.compile=true` (each decoder block compiled; its first
             step includes the compile, so it shows in "time to first step", not in tokens/s);
  trl        `SFTTrainer(packing=True, packing_strategy="bfd", padding_free=True)` on the same
             samples (pre-tokenized `input_ids` + `labels`), one packed row per step; it re-packs
             them itself, so its row count may differ by one or two (all tokens still trained once);
             gradient checkpointing off (SFTConfig's default is on) like the other two;
  hf         `transformers.Trainer`, one padded batch per step holding the samples of the
             corresponding tuneforge row (`DataCollatorForSeq2Seq` padding, labels -100 on the
             prompt), in tuneforge's order - so its per-step real tokens equal tuneforge's.
Loss tokens are the assistant answer + its `<|im_end|>` in every system (tuneforge's masks).

Each run is its own subprocess (peak RSS = that child's VmHWM after training); systems
alternate A B C A B C for `--repeats` rounds and the table shows medians. Metrics: real
(non-pad) tokens/s over the steps after the first `--warmup` (3), ratio to tuneforge, peak RSS, time from
process start to the first optimizer step done, and the loss after the same tokens: the
held-out loss of the trained adapter on `--eval-samples` GSM8K samples no system trained on
(same code for all; deterministic, so computed in the first round only), plus the token-weighted
mean training loss. TRL's padding-free batch is also checked for cross-sample attention (packed
logits vs each sample run alone, first round). The `tuneforge --help` cold
start (median of 5) is included. Writes benchmarks/results/compare.json. Not part of the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("tuneforge", "tuneforge_compile", "trl", "hf")
LABELS = {"tuneforge": "tuneforge (packed, varlen, chunked CE)",
          "tuneforge_compile": "tuneforge + model.compile (per block)",
          "trl": "TRL SFTTrainer (bfd packing, padding-free)",
          "hf": "HF Trainer (padded batches)"}
IGNORE = -100


# --------------------------------------------------------------------------------------------
# phase: prepare (tokenize once with tuneforge, replay its sampler, write the shared examples)
# --------------------------------------------------------------------------------------------

def tuneforge_config(spec: dict) -> dict:
    """The tuneforge config of the benchmark (JSON is YAML)."""
    return {
        "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "varlen",
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "data": {"datasets": [{"path": spec["data"], "format": "alpaca",
                               "columns": {"instruction": "question", "output": "answer"}}],
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
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]

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
            rec = records[ex["origin"]]
            ref = tokenizer.apply_chat_template([{"role": "user", "content": rec["question"]},
                                                 {"role": "assistant", "content": rec["answer"]}], tokenize=True)
            ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
            if list(ref)[: spec["max_length"]] != ex["input_ids"]:
                raise SystemExit(f"sample {ex['origin']}: tuneforge ids differ from apply_chat_template")
            checked += 1
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    first = steps[0][0]
    trained_ids = [t for t, lab in zip(first["input_ids"], first["labels"]) if lab != IGNORE]
    per_step = [{"samples": len(s), "tokens": sum(len(e["input_ids"]) for e in s),
                 "loss_tokens": sum(sum(1 for x in e["labels"] if x != IGNORE) for e in s),
                 "padded_tokens": len(s) * max(len(e["input_ids"]) for e in s)} for s in steps]
    (Path(spec["work"]) / "examples.json").write_text(json.dumps({"steps": steps, "held_out": held_out}))
    (Path(spec["work"]) / "prepare.json").write_text(json.dumps({
        "config": str(config_path), "build_data_s": build_s, "rows_per_epoch": len(data),
        "packing_efficiency": data.report["packing_efficiency"], "per_step": per_step,
        "held_out_samples": len(held_out), "held_out_tokens": sum(len(e["input_ids"]) for e in held_out),
        "apply_chat_template_checked": checked,
        "loss_mask_ends_with_im_end": bool(trained_ids and trained_ids[-1] == end_id),
        "first_sample_trained_text_tail": tokenizer.decode(trained_ids[-12:]),
    }))


# --------------------------------------------------------------------------------------------
# shared child helpers
# --------------------------------------------------------------------------------------------

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


def summarize_steps(steps: list[dict], warmup: int = 1) -> dict:
    """Totals of the recorded steps; tokens/s over the steps after the first `warmup` ones."""
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

def run_tuneforge_compiled(spec: dict, examples: dict, out_dir: Path) -> dict:
    """tuneforge with `model.compile=true`: the first step includes compiling (time to first step)."""
    return run_tuneforge(spec, examples, out_dir, overrides=["model.compile=true"])


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
    """One item per optimizer step: the samples of the matching tuneforge row."""

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
    args = trainer_args(TrainingArguments, spec, out_dir, max_steps=len(examples["steps"]),
                        train_sampling_strategy="sequential", remove_unused_columns=False)
    steps, token_log = [], []
    cls = counting_trainer(Trainer)
    trainer = cls(model=model, args=args, train_dataset=GroupDataset(examples["steps"]), data_collator=collate,
                  callbacks=[step_record_callback(steps, token_log)])
    trainer.token_log, trainer.bench_spec = token_log, spec
    trainer.train()
    rss = peak_rss_mb()
    result = {**summarize_steps(steps, spec["warmup"]), "peak_rss_mb": rss}
    if spec.get("evaluate"):
        started = time.time()
        result["held_out_loss"] = held_out_loss(trainer.model, examples["held_out"])
        result["eval_s"] = time.time() - started
    return result


def phase_run(system: str, spec_path: Path, out_path: Path, evaluate: bool) -> None:
    spec = {**json.loads(spec_path.read_text()), "evaluate": evaluate}
    examples = json.loads((Path(spec["work"]) / "examples.json").read_text())
    out_dir = Path(spec["work"]) / f"out_{system}"
    out_dir.mkdir(exist_ok=True)
    runner = {"tuneforge": run_tuneforge, "tuneforge_compile": run_tuneforge_compiled, "trl": run_trl, "hf": run_hf}[system]
    result = runner(spec, examples, out_dir)
    out_path.write_text(json.dumps(result))


# --------------------------------------------------------------------------------------------
# parent
# --------------------------------------------------------------------------------------------

def child(args: list[str], log: Path, timeout: float, script: Path = Path(__file__)) -> tuple[float, subprocess.CompletedProcess]:
    """`python SCRIPT args` (this benchmark by default) with its output in `log`; exits on failure."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    started = time.time()
    with log.open("w") as handle:
        proc = subprocess.run([sys.executable, str(script), *args], stdout=handle, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, cwd=REPO)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        raise SystemExit(f"child {' '.join(args)} failed ({proc.returncode}); log {log}:\n{tail}")
    return started, proc


def cli_cold_start(n: int = 5) -> dict:
    exe = Path(sys.executable).parent / "tuneforge"
    cmd = [str(exe), "--help"] if exe.exists() else [sys.executable, "-m", "tuneforge", "--help"]
    times = []
    for _ in range(n):
        started = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - started)
    return {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)), "median_s": statistics.median(times),
            "runs_s": times}


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "tuneforge"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--data", default="/work/shared/data/gsm8k_train.jsonl")
    parser.add_argument("--template", default="tokenizer", help="tuneforge template name (default: the tokenizer's ChatML)")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (one packed row of --max-length each)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps left out of tokens/s (first-step set-up; compiling under model.compile)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-samples", type=int, default=8, help="held-out samples for the loss after training")
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--work", help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare.json"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prepare":
        return phase_prepare(Path(args.spec))
    if args.phase:
        return phase_run(args.phase, Path(args.spec), Path(args.result), args.evaluate)

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or args.steps <= args.warmup or args.warmup < 1:
        parser.error(f"unknown systems {sorted(unknown)}" if unknown else "need --steps > --warmup >= 1")
    if "trl" in systems and importlib.util.find_spec("trl") is None:
        parser.error("TRL is not installed: pip install -e '.[bench]' (or --systems tuneforge,hf)")
    bench_started = time.time()
    with tempfile.TemporaryDirectory(prefix="tf_compare_") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()), "template": args.template,
                "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
                "seed": args.seed, "eval_samples": args.eval_samples, "work": str(work)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))

        help_timing = cli_cold_start()
        print(f"`{help_timing['command']}` cold start: median {help_timing['median_s']:.3f}s of 5", flush=True)
        _, _ = child(["--phase", "prepare", "--spec", str(spec_path)], work / "prepare.log", args.timeout)
        prep = json.loads((work / "prepare.json").read_text())
        spec["config"] = prep["config"]
        spec_path.write_text(json.dumps(spec, indent=1))
        workload_tokens = sum(s["tokens"] for s in prep["per_step"])
        print(f"workload: {args.steps} steps, {sum(s['samples'] for s in prep['per_step'])} samples, "
              f"{workload_tokens:,} real tokens ({workload_tokens / args.steps:.0f}/step), "
              f"{sum(s['loss_tokens'] for s in prep['per_step']):,} loss tokens; held-out {prep['held_out_samples']} samples",
              flush=True)

        runs = []
        for round_index in range(args.repeats):
            for system in systems:
                result_path = work / f"result_{system}_{round_index}.json"
                load = os.getloadavg()[0]
                # the held-out loss (and TRL's isolation check) is deterministic: computed in the first round only
                started, _ = child(["--phase", system, "--spec", str(spec_path), "--result", str(result_path)]
                                   + (["--evaluate"] if round_index == 0 else []),
                                   work / f"{system}_{round_index}.log", args.timeout)
                wall = time.time() - started
                result = json.loads(result_path.read_text())
                result.update(system=system, round=round_index, wall_s=wall, load_avg_1m_before=load,
                              time_to_first_step_s=result.pop("first_step_done") - started)
                runs.append(result)
                print(f"  round {round_index + 1}/{args.repeats} {system:<9} {result['tokens_per_s'] or 0:8.1f} tok/s  "
                      f"first step {result['time_to_first_step_s']:6.1f}s  RSS {result['peak_rss_mb']:6.0f} MB  "
                      f"held-out loss {result.get('held_out_loss', float('nan')):.4f}  wall {wall:.0f}s  (load {load:.1f})", flush=True)

    summary = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        summary[system] = {
            "label": LABELS[system], "runs": len(mine),
            "tokens_per_s": median([r["tokens_per_s"] for r in mine]),
            "peak_rss_mb": median([r["peak_rss_mb"] for r in mine]),
            "time_to_first_step_s": median([r["time_to_first_step_s"] for r in mine]),
            "held_out_loss": median([r.get("held_out_loss") for r in mine]),
            "train_loss_mean": median([r["train_loss_mean"] for r in mine]),
            "first_step_loss": median([r["losses"][0] for r in mine]),
            "steps": mine[0]["steps"], "real_tokens": mine[0]["tokens"], "padded_tokens": mine[0]["padded_tokens"],
            "loss_tokens": mine[0]["loss_tokens"], "wall_s": median([r["wall_s"] for r in mine]),
        }
        if system == "trl":
            summary[system]["cross_sample_check"] = mine[0].get("cross_sample_check")
            summary[system]["packed_rows"] = mine[0].get("packed_rows")
            summary[system]["attn_implementation"] = mine[0].get("attn_implementation")
    base = summary.get("tuneforge", {}).get("tokens_per_s")
    for s in summary.values():
        s["ratio_to_tuneforge"] = s["tokens_per_s"] / base if base and s["tokens_per_s"] else None
    # Did every system train on the workload's tokens? (per step for tuneforge/hf, in total for TRL's own packing)
    expected = [s["tokens"] for s in prep["per_step"]]
    expected_loss = sum(s["loss_tokens"] for s in prep["per_step"])
    checks = {}
    for system in systems:
        mine = [r for r in runs if r["system"] == system]
        same = all((r["step_tokens"] == expected) if system != "trl" else (r["tokens"] == sum(expected)) for r in mine)
        checks[f"{system}_tokens_as_planned"] = same and all(r["loss_tokens"] == expected_loss for r in mine)
    if "tuneforge" in summary and "hf" in summary:  # same rows, same order, same LoRA init: same first-step loss
        checks["hf_vs_tuneforge_first_step_loss_abs_diff"] = abs(summary["hf"]["first_step_loss"] -
                                                                 summary["tuneforge"]["first_step_loss"])

    header = (f"{'system':<44} {'steps':>5} {'real tok':>9} {'pad eff':>7} {'tok/s':>8} {'vs tf':>6} {'RSS MB':>7} "
              f"{'1st step s':>10} {'train loss':>10} {'held-out':>9}")
    print()
    print(f"medians of {args.repeats} round(s); {args.steps} steps of up to {args.max_length} tokens, tokens/s after "
          f"the first {args.warmup}; model {Path(args.model).name}")
    print(header)
    print("-" * len(header))
    for system, s in summary.items():
        ratio = f"{s['ratio_to_tuneforge']:.2f}x" if s["ratio_to_tuneforge"] else "-"
        print(f"{s['label']:<44} {s['steps']:>5} {s['real_tokens']:>9,} {s['real_tokens'] / s['padded_tokens']:>7.3f} "
              f"{s['tokens_per_s'] or 0:>8.1f} {ratio:>6} {s['peak_rss_mb']:>7.0f} {s['time_to_first_step_s']:>10.1f} "
              f"{s['train_loss_mean'] or float('nan'):>10.4f} {s['held_out_loss'] or float('nan'):>9.4f}")
    print(f"`{help_timing['command']}` cold start: {help_timing['median_s']:.3f}s (median of 5)")
    if "trl" in summary and summary["trl"].get("cross_sample_check"):
        c = summary["trl"]["cross_sample_check"]
        print(f"TRL padding-free on {summary['trl']['attn_implementation']}: packed vs alone max |dlogit| "
              f"{c['max_abs_logit_diff']:.2e} over {c['samples_in_row']} samples -> "
              f"{'no cross-sample attention' if c['isolated'] else 'SAMPLES ATTEND TO EACH OTHER'}")
    print("checks: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "spec", "result")},
        "environment": {**versions(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workload": prep, "cli_help_cold_start": help_timing, "summary": summary, "checks": checks, "runs": runs,
        "total_wall_s": time.time() - bench_started,
    }, indent=1))
    print(f"wrote {out} (total {time.time() - bench_started:.0f}s)")


if __name__ == "__main__":
    main()
