"""tuneforge vs TRL DPOTrainer: LoRA DPO side by side on the same pairs (not part of the tests).

    python benchmarks/compare_dpo.py [--model .cache/smollm2-135m-instruct] [--steps 6] [--warmup 2] [--repeats 1]

One workload for both: SmolLM2-135M-Instruct, LoRA r=16 (alpha 32, dropout 0, all linear layers),
fp32 on the CPU, DPO sigmoid with beta 0.1, reference = the model with the adapter disabled, AdamW,
tuneforge's warmup + cosine schedule, clip 1.0, the tokenizer's chat template, max_length per
sequence. The parent tokenizes the GSM8K pairs once with tuneforge's pipeline and replays its seeded
sampler to learn which pairs its `--steps` steps train on (rows of whole pairs, soft-packed to
2 x max_length); TRL gets exactly those pairs (its own tokenization of the same conversations,
batches of `--trl-batch` pairs padded). Each run is its own subprocess; systems alternate for
`--repeats` rounds; the table shows medians of real (non-pad) tokens/s after the first `--warmup`
steps and of peak RSS (VmHWM). After training, each system's adapter is scored by the same code on
`--held-out` pairs neither trained on: DPO reward accuracy and mean margin (beta x log-ratio to
the adapter-less model). Writes benchmarks/results/compare_dpo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import compare as sft_bench  # the SFT benchmark's runner: child processes, medians, versions
import compare_systems as systems  # its systems' shared pieces: schedule, LoRA config, step timing, VmHWM

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("tuneforge", "trl")
LABELS = {"tuneforge": "tuneforge DPO (pairs packed, varlen, adapter-off reference)",
          "trl": "TRL DPOTrainer (padded pairs, adapter-off reference)"}


def tuneforge_config(spec: dict, data: str) -> dict:
    return {
        "model": {"path": spec["model"], "dtype": "float32", "attn_implementation": "varlen",
                  "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}},
        "data": {"datasets": [{"path": data, "format": "preference"}], "template": "tokenizer",
                 "max_length": spec["max_length"], "packing": "soft", "sampler": "random",
                 "cache_dir": str(Path(spec["work"]) / "data_cache")},
        "train": {"objective": "dpo", "preference": {"beta": spec["beta"]}, "micro_batch_size": 1,
                  "gradient_accumulation": 1, "max_steps": spec["steps"], "lr": spec["lr"], "weight_decay": 0.0,
                  "warmup_ratio": spec["warmup_ratio"], "lr_scheduler": "cosine", "max_grad_norm": 1.0,
                  "seed": spec["seed"], "save_every": 0, "log_every": 1, "work_dir": str(Path(spec["work"]) / "tf_run")},
        "parallel": {"strategy": "single"},
    }


def phase_prepare(spec_path: Path) -> None:
    """The pairs of tuneforge's `steps` steps (TRL trains on the same ones) and the held-out pairs."""
    from tuneforge.config import load_config
    from tuneforge.data.dataset import build_data
    from tuneforge.data.samplers import RowSampler
    from tuneforge.model.load import load_tokenizer

    spec = json.loads(spec_path.read_text())
    work = Path(spec["work"])
    records = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines() if line.strip()]
    pool, held_out = records[: spec["pool"]], records[-spec["held_out"]:]  # disjoint: the file's head and tail
    (work / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pool))
    (work / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    config = work / "tuneforge.yaml"
    config.write_text(json.dumps(tuneforge_config(spec, str(work / "pool.jsonl")), indent=1))
    cfg = load_config(str(config))
    data = build_data(cfg, load_tokenizer(cfg.model.path))
    sampler = RowSampler(data.lengths, cfg.data.sampler, rank=0, world=1, seed=cfg.train.seed, batch_per_rank=1)
    trained = []
    for _ in range(spec["steps"]):
        for ids, trained_mask, (_, origin) in data.row(int(sampler.take(1)[0])):
            if origin not in trained:
                trained.append(origin)
    (work / "trl_pairs.jsonl").write_text("".join(json.dumps(pool[i]) + "\n" for i in trained))
    (work / "prepare.json").write_text(json.dumps({"config": str(config), "pairs": len(trained)}))


def held_out_rewards(model, spec: dict) -> dict:
    """DPO reward accuracy and mean margin on the held-out pairs (same code for both systems)."""
    import torch

    from tuneforge.config import load_config
    from tuneforge.data.collate import collate_rows
    from tuneforge.data.dataset import build_data
    from tuneforge.model.load import load_tokenizer
    from tuneforge.train.preference import adapters_off, sequence_logps

    work = Path(spec["work"])
    cfg = load_config(str(work / "tuneforge.yaml"), [f"data.datasets.0.path={work / 'held_out.jsonl'}",
                                                     "data.packing=none"])
    tokenizer = load_tokenizer(cfg.model.path)
    data = build_data(cfg, tokenizer)
    model.eval()
    margins = []
    with torch.no_grad():
        for r in range(len(data)):
            batch = collate_rows([data.row(r)], tokenizer.pad_token_id)
            policy = sequence_logps(model, batch, 1024)[0].double()
            with adapters_off(model):
                reference = sequence_logps(model, batch, 1024)[0].double()
            ratio = spec["beta"] * (policy - reference)
            margins.append(float(ratio[0] - ratio[1]))
    return {"held_out_pairs": len(margins), "held_out_reward_accuracy": sum(m > 0 for m in margins) / len(margins),
            "held_out_reward_margin": sum(margins) / len(margins)}


def run_tuneforge(spec: dict, out_dir: Path) -> dict:
    from peft import PeftModel

    result = systems.run_tuneforge({**spec, "evaluate": False}, {}, out_dir)
    model = PeftModel.from_pretrained(systems.load_base(spec), str(out_dir / "run" / "final"))
    return {**result, **held_out_rewards(model, spec)}


def run_trl(spec: dict, out_dir: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [json.loads(line) for line in (Path(spec["work"]) / "trl_pairs.jsonl").read_text().splitlines()]
    torch.manual_seed(spec["seed"])
    steps, token_log = [], []

    class Counting(DPOTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            real = int(inputs["attention_mask"].sum())
            token_log.append((real, int(inputs["input_ids"].numel()), int(inputs["completion_mask"].sum())))
            return super().training_step(model, inputs, *args, **kwargs)

        def create_scheduler(self, num_training_steps, optimizer=None):
            if self.lr_scheduler is None:
                self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
                    optimizer or self.optimizer, systems.lr_lambda(spec, num_training_steps))
            return self.lr_scheduler

    args = systems.trainer_args(DPOConfig, spec, out_dir, beta=spec["beta"], loss_type=["sigmoid"],
                                  max_length=spec["max_length"], dataset_num_proc=None)
    args.per_device_train_batch_size = spec["trl_batch"]
    trainer = Counting(model=systems.load_base(spec), args=args, train_dataset=Dataset.from_list(pairs),
                       processing_class=systems.load_tokenizer_hf(spec), peft_config=systems.lora_config(),
                       callbacks=[systems.step_record_callback(steps, token_log)])
    trainer.train()
    result = {**systems.summarize_steps(steps, spec["warmup"]), "peak_rss_mb": systems.peak_rss_mb(),
              "attn_implementation": trainer.model.config._attn_implementation}
    return {**result, **held_out_rewards(trainer.model, spec)}


def child(args: list[str], log: Path, timeout: float) -> float:
    """This script as a child process (compare.py's runner); returns its start time."""
    return sft_bench.child(args, log, timeout, script=Path(__file__))[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "gsm8k_pref_train.jsonl"))
    parser.add_argument("--max-length", type=int, default=512, help="tokens per sequence (prompt + answer)")
    parser.add_argument("--steps", type=int, default=6, help="tuneforge optimizer steps (one row of whole pairs each)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--trl-batch", type=int, default=2, help="pairs per TRL step")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--pool", type=int, default=400, help="pairs tuneforge samples its steps from")
    parser.add_argument("--held-out", type=int, default=32, help="pairs scored after training (never trained on)")
    parser.add_argument("--work", help="keep the work files here (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "compare_dpo.json"))
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prepare":
        return phase_prepare(Path(args.spec))
    if args.phase:
        spec = json.loads(Path(args.spec).read_text())
        out_dir = Path(args.result).with_suffix("")
        result = (run_tuneforge if args.phase == "tuneforge" else run_trl)(spec, out_dir)
        Path(args.result).write_text(json.dumps(result))
        return None
    if args.steps <= args.warmup or args.warmup < 1:
        parser.error("need --steps > --warmup >= 1")
    with tempfile.TemporaryDirectory(prefix="tf_compare_dpo_") as tmp:
        work = Path(args.work).resolve() if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        spec = {"model": str(Path(args.model).resolve()), "data": str(Path(args.data).resolve()), "max_length": args.max_length,
                "steps": args.steps, "warmup": args.warmup, "trl_batch": args.trl_batch, "beta": args.beta, "lr": args.lr,
                "warmup_ratio": args.warmup_ratio, "seed": args.seed, "pool": args.pool, "held_out": args.held_out,
                "work": str(work)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        child(["--phase", "prepare", "--spec", str(spec_path)], work / "prepare.log", args.timeout)
        prep = json.loads((work / "prepare.json").read_text())
        spec["config"] = prep["config"]
        spec_path.write_text(json.dumps(spec, indent=1))
        print(f"workload: {args.steps} tuneforge steps over {prep['pairs']} pairs; TRL the same pairs, "
              f"{args.trl_batch} per step", flush=True)
        runs = []
        for round_index in range(args.repeats):
            for system in SYSTEMS:
                result_path = work / f"result_{system}_{round_index}.json"
                load = os.getloadavg()[0]
                started = child(["--phase", system, "--spec", str(spec_path), "--result", str(result_path)],
                                work / f"{system}_{round_index}.log", args.timeout)
                result = json.loads(result_path.read_text())
                result.update(system=system, round=round_index, wall_s=time.time() - started, load_avg_1m_before=load)
                runs.append(result)
                print(f"  round {round_index + 1}/{args.repeats} {system:<9} {result['tokens_per_s'] or 0:8.1f} tok/s  "
                      f"RSS {result['peak_rss_mb']:6.0f} MB  held-out reward accuracy "
                      f"{result['held_out_reward_accuracy']:.3f} margin {result['held_out_reward_margin']:.3f}  "
                      f"(load {load:.1f})", flush=True)
    summary = {}
    for system in SYSTEMS:
        mine = [r for r in runs if r["system"] == system]
        summary[system] = {"label": LABELS[system], "runs": len(mine),
                           **{key: sft_bench.median([r[key] for r in mine]) for key in
                              ("tokens_per_s", "peak_rss_mb", "held_out_reward_accuracy", "held_out_reward_margin")},
                           "steps": mine[0]["steps"], "tokens": mine[0]["tokens"], "padded_tokens": mine[0]["padded_tokens"]}
    ratios = {"tokens_per_s_vs_trl": summary["tuneforge"]["tokens_per_s"] / summary["trl"]["tokens_per_s"],
              "peak_rss_vs_trl": summary["tuneforge"]["peak_rss_mb"] / summary["trl"]["peak_rss_mb"]}
    out = {"spec": {k: v for k, v in spec.items() if k != "work"}, "versions": sft_bench.versions(),
           "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "summary": summary, "ratios": ratios, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    return None


if __name__ == "__main__":
    main()
