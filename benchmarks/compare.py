"""tuneforge vs TRL SFTTrainer (packing) vs HF Trainer (padded batches): LoRA SFT side by side.

    python benchmarks/compare.py [--workload gsm8k|alpaca] [--model .cache/smollm2-135m-instruct] [--steps 8]
                                 [--warmup 3] [--repeats 3]
    python benchmarks/compare.py --steps 2 --warmup 1 --repeats 1 --max-length 256 --systems tuneforge,hf  # smoke

One workload for all three systems: the same model, LoRA (r=16, alpha=32, dropout 0, all linear
layers, fp32), learning-rate schedule (warmup + cosine, AdamW, clip 1.0), sequence length and the
very same token ids and loss masks. The parent tokenizes the workload's data ONCE with tuneforge's
pipeline (workloads in compare_workloads.py: `gsm8k`, rows of 1,024 tokens; `alpaca`, long-tailed
lengths, rows of 2,048)
(`prepare` phase), replays tuneforge's seeded row sampler to learn which packed rows (= which
samples) its `--steps` optimizer steps will train on, and hands exactly those samples to the
others:
  tuneforge  `tuneforge train` with its defaults (soft packing + varlen attention + chunked CE,
             and `model.compile: auto`, which compiles each decoder block of this 135M model
             on the CPU: its first step includes the compile, from an empty compile cache, so it
             shows in "time to first step", not in tokens/s), one packed row of `--max-length`
             tokens per step;
  tuneforge_eager  the same with `model.compile=false` (eager, with heap trimming);
  trl        `SFTTrainer(packing=True, packing_strategy="bfd", padding_free=True)` on the same
             samples (pre-tokenized `input_ids` + `labels`), one packed row per step; it re-packs
             them itself, so its row count may differ by one or two (all tokens still trained once);
             gradient checkpointing off (SFTConfig's default is on) like the other two;
  hf         `transformers.Trainer` on padded batches (`DataCollatorForSeq2Seq` padding, labels
             -100 on the prompt): on gsm8k one batch per step holding the samples of the
             corresponding tuneforge row, in tuneforge's order, so its per-step real tokens
             equal tuneforge's; on alpaca the same samples shuffled into batches of 8 padded to
             the longest (what users run without packing), tokens/s after as many first steps
             as hold the real tokens of tuneforge's `--warmup` rows.
Loss tokens are the assistant answer + its `<|im_end|>` in every system (tuneforge's masks).

Each run is its own subprocess (peak RSS = that child's VmHWM after training); systems
alternate A B C A B C for `--repeats` rounds and the table shows medians. Metrics: real
(non-pad) tokens/s over the steps after the first `--warmup` (3), ratio to tuneforge, peak RSS, time from
process start to the first optimizer step done, and the loss after the same tokens: the
held-out loss of the trained adapter on `--eval-samples` GSM8K samples no system trained on
(same code for all; deterministic, so computed in the first round only), plus the token-weighted
mean training loss. TRL's padding-free batch is also checked for cross-sample attention (packed
logits vs each sample run alone, first round). The `tuneforge --help` cold
start (median of 5) is included.

CPU efficiency (bench_flops.py): a child measures this CPU's fp32 `torch.mm` FLOP/s at the model's
shapes (the best shape is the peak); each system's achieved FLOP/s is its real tokens/s x the
workload's useful FLOPs per real token (the same for all: they train the same tokens), reported
as a fraction of that peak, next to the share of the FLOPs it executes that are useful (padding,
LM head on non-loss tokens). Writes benchmarks/results/compare.json (gsm8k) or
compare_alpaca.json (alpaca) unless --out says otherwise. Not part of the tests.
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

from compare_systems import run_hf, run_trl, run_tuneforge, run_tuneforge_eager
from compare_workloads import WORKLOADS, phase_prepare

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ("tuneforge", "tuneforge_eager", "trl", "hf")
LABELS = {"tuneforge": "tuneforge defaults (packed, varlen, chunked CE, compile auto)",
          "tuneforge_eager": "tuneforge, model.compile: false",
          "trl": "TRL SFTTrainer (bfd packing, padding-free)",
          "hf": "HF Trainer (padded batches)"}


def phase_peak(spec_path: Path, out_path: Path) -> None:
    from bench_flops import matmul_peak, model_dims

    spec = json.loads(spec_path.read_text())
    out_path.write_text(json.dumps(matmul_peak(model_dims(spec["model"]), spec["max_length"])))


def phase_run(system: str, spec_path: Path, out_path: Path, evaluate: bool) -> None:
    spec = {**json.loads(spec_path.read_text()), "evaluate": evaluate}
    examples = json.loads((Path(spec["work"]) / "examples.json").read_text())
    out_dir = Path(spec["work"]) / f"out_{system}"
    out_dir.mkdir(exist_ok=True)
    runner = {"tuneforge": run_tuneforge, "tuneforge_eager": run_tuneforge_eager, "trl": run_trl, "hf": run_hf}[system]
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


def summarize(runs: list[dict], systems: list[str], prep: dict, peak: dict) -> dict:
    """Medians per system, the ratio to tuneforge, and the FLOP/s fractions of the matmul peak."""
    summary = {}
    useful_per_token = prep["flops"]["useful"] / sum(s["tokens"] for s in prep["per_step"])
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
        s = summary[system]
        executed = prep["flops"].get(system.replace("_compile", ""), prep["flops"]["useful"])
        s["useful_flops_per_s"] = s["tokens_per_s"] * useful_per_token if s["tokens_per_s"] else None
        s["useful_fraction_of_peak"] = s["useful_flops_per_s"] / peak["peak_flops"] if s["useful_flops_per_s"] else None
        s["useful_share_of_executed"] = prep["flops"]["useful"] / executed
        s["executed_fraction_of_peak"] = (s["useful_fraction_of_peak"] / s["useful_share_of_executed"]
                                          if s["useful_fraction_of_peak"] else None)
    base = summary.get("tuneforge", {}).get("tokens_per_s")
    for s in summary.values():
        s["ratio_to_tuneforge"] = s["tokens_per_s"] / base if base and s["tokens_per_s"] else None
    return summary


def run_checks(runs: list[dict], systems: list[str], prep: dict, summary: dict) -> dict:
    """Did every system train on the workload's tokens? (per step for tuneforge/hf, in total for
    TRL's own packing); on the same rows, HF's first-step loss must equal tuneforge's."""
    expected_loss = sum(s["loss_tokens"] for s in prep["per_step"])
    checks = {}
    for system in systems:
        expected = [s["tokens"] for s in (prep["hf_per_step"] if system == "hf" else prep["per_step"])]
        mine = [r for r in runs if r["system"] == system]
        same = all((r["step_tokens"] == expected) if system != "trl" else (r["tokens"] == sum(expected)) for r in mine)
        checks[f"{system}_tokens_as_planned"] = same and all(r["loss_tokens"] == expected_loss for r in mine)
    same_rows = prep["hf_per_step"] == prep["per_step"]
    if "tuneforge" in summary and "hf" in summary and same_rows:  # same rows, order and LoRA init: same first loss
        checks["hf_vs_tuneforge_first_step_loss_abs_diff"] = abs(summary["hf"]["first_step_loss"] -
                                                                 summary["tuneforge"]["first_step_loss"])
    return checks


def print_table(summary: dict, checks: dict, args, help_timing: dict, peak: dict) -> None:
    header = (f"{'system':<44} {'steps':>5} {'real tok':>9} {'pad eff':>7} {'tok/s':>8} {'vs tf':>6} {'RSS MB':>7} "
              f"{'1st step s':>10} {'train loss':>10} {'held-out':>9} {'% peak':>6} {'useful':>6}")
    print()
    print(f"{args.workload}: medians of {args.repeats} round(s); {args.steps} rows of up to {args.max_length} tokens, "
          f"tokens/s after the first {args.warmup}; model {Path(args.model).name}; fp32 mm peak "
          f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s")
    print(header)
    print("-" * len(header))
    for s in summary.values():
        ratio = f"{s['ratio_to_tuneforge']:.2f}x" if s["ratio_to_tuneforge"] else "-"
        print(f"{s['label']:<44} {s['steps']:>5} {s['real_tokens']:>9,} {s['real_tokens'] / s['padded_tokens']:>7.3f} "
              f"{s['tokens_per_s'] or 0:>8.1f} {ratio:>6} {s['peak_rss_mb']:>7.0f} {s['time_to_first_step_s']:>10.1f} "
              f"{s['train_loss_mean'] or float('nan'):>10.4f} {s['held_out_loss'] or float('nan'):>9.4f} "
              f"{100 * (s['useful_fraction_of_peak'] or 0):>5.1f}% {100 * s['useful_share_of_executed']:>5.1f}%")
    print("% peak: useful FLOP/s (same FLOPs per real token for every system) / the fp32 mm peak; "
          "useful: useful / executed FLOPs (padding, LM head on non-loss tokens)")
    print(f"`{help_timing['command']}` cold start: {help_timing['median_s']:.3f}s (median of 5)")
    if "trl" in summary and summary["trl"].get("cross_sample_check"):
        c = summary["trl"]["cross_sample_check"]
        print(f"TRL padding-free on {summary['trl']['attn_implementation']}: packed vs alone max |dlogit| "
              f"{c['max_abs_logit_diff']:.2e} over {c['samples_in_row']} samples -> "
              f"{'no cross-sample attention' if c['isolated'] else 'SAMPLES ATTEND TO EACH OTHER'}")
    print("checks: " + ", ".join(f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in checks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / ".cache" / "smollm2-135m-instruct"))
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="gsm8k", help="data set and HF batching")
    parser.add_argument("--data", help="the workload's data file (default: its file in ../shared/data)")
    parser.add_argument("--template", default="tokenizer", help="tuneforge template name (default: the tokenizer's ChatML)")
    parser.add_argument("--max-length", type=int, help="packed row length (default: the workload's, 1024 or 2048)")
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
    parser.add_argument("--out", help="result JSON (default: results/compare.json, or compare_WORKLOAD.json)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--evaluate", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "prepare":
        return phase_prepare(Path(args.spec))
    if args.phase == "peak":
        return phase_peak(Path(args.spec), Path(args.result))
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
        workload = WORKLOADS[args.workload]
        args.data = str(Path(args.data or workload["data"]).resolve())
        args.max_length = args.max_length or workload["max_length"]
        args.out = args.out or str(Path(__file__).parent / "results" /
                                   ("compare.json" if args.workload == "gsm8k" else f"compare_{args.workload}.json"))
        spec = {"model": str(Path(args.model).resolve()), "data": args.data, "template": args.template,
                "workload": args.workload, "columns": workload["columns"], "hf_batching": workload["hf_batching"],
                "max_length": args.max_length, "steps": args.steps, "warmup": args.warmup, "lr": args.lr, "warmup_ratio": args.warmup_ratio,
                "seed": args.seed, "eval_samples": args.eval_samples, "work": str(work)}
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))

        help_timing = cli_cold_start()
        print(f"`{help_timing['command']}` cold start: median {help_timing['median_s']:.3f}s of 5", flush=True)
        _, _ = child(["--phase", "prepare", "--spec", str(spec_path)], work / "prepare.log", args.timeout)
        prep = json.loads((work / "prepare.json").read_text())
        spec["config"] = prep["config"]
        spec["warmup_tokens"] = sum(s["tokens"] for s in prep["per_step"][: args.warmup])
        spec_path.write_text(json.dumps(spec, indent=1))
        child(["--phase", "peak", "--spec", str(spec_path), "--result", str(work / "peak.json")], work / "peak.log",
              args.timeout)
        peak = json.loads((work / "peak.json").read_text())
        print(f"fp32 torch.mm peak at the model's shapes: {peak['peak_flops'] / 1e9:.1f} GFLOP/s "
              f"({peak['threads']} threads)", flush=True)
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

    summary = summarize(runs, systems, prep, peak)
    checks = run_checks(runs, systems, prep, summary)
    print_table(summary, checks, args, help_timing, peak)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "settings": {k: v for k, v in vars(args).items() if k not in ("phase", "spec", "result")},
        "environment": {**versions(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "workload": prep, "matmul_peak": peak, "cli_help_cold_start": help_timing, "summary": summary,
        "checks": checks, "runs": runs,
        "total_wall_s": time.time() - bench_started,
    }, indent=1))
    print(f"wrote {out} (total {time.time() - bench_started:.0f}s)")


if __name__ == "__main__":
    main()
