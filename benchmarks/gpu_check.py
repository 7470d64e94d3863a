"""GPU acceptance check: one script that runs the GPU path end to end and reports it.

    scripts/gpu_check.sh [--dry-run] [--out FILE] [--steps N]

On one NVIDIA GPU (H100/H200 class; about 5-8 minutes) it writes `benchmarks/results/
gpu_check.json` and prints a table of:
1. the bf16 matmul peak of this GPU, measured (torch.mm at 8192^3), the MFU denominator;
2. varlen attention on packed rows: the per-document SDPA path and flash-attention (when it
   imports) in bf16 against an fp32 per-document reference, forward output and the gradients
   of q, k, v; passes when max|err| / max|ref| <= 2e-2 (bf16 has 8 mantissa bits, 3.9e-3);
3. training a ~1.1B-parameter Llama-shaped model (random weights: 16 layers, hidden 2048,
   intermediate 8192, 32/8 heads, vocab 32000) on packed 4096-token rows (long-tailed document
   lengths): bf16 full fine-tune, LoRA, QLoRA, gradient checkpointing and model.compile, each
   with tokens/s, MFU against the measured peak, and peak `max_memory_allocated` against
   `tuneforge plan` (its estimate without the fixed 1 GB CUDA-context overhead, which the
   allocator does not see; target within 10%);
4. FSDP2 on one GPU over NCCL: a DCP checkpoint at step 2 and a resume from it, compared with
   the uninterrupted run (losses and final weights: exact, or the largest difference);
5. TRL's SFTTrainer (packing, padding-free) on the same rows: tokens/s and tuneforge's ratio
   to it (skipped, with the reason, when trl is not installed).
Goals when it runs: >= 50% MFU on the bf16 full fine-tune, >= 1.3x TRL's tokens/s.

`--dry-run` runs the same plumbing on the CPU in fp32 (gloo for FSDP) with a 2-layer model and
128-token rows; the test suite runs it (tests/test_gpu_check.py). Everything runs in this one
process; runs are written to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ATTENTION_TOL = 2e-2  # max|err| / max|ref|, bf16 against fp32
SHAPES = {  # model config, row length, matmul size for the peak
    "gpu": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000), 4096, 8192),
    "dry": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512), 128, 256),
}
VARIANTS = {  # name -> config overrides on top of the bf16 full fine-tune
    "full_bf16": [],
    "lora": ["model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0.0"],
    "qlora": ["model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0.0", "model.quantization.bits=4"],
    "checkpointing": ["model.gradient_checkpointing=true"],
    "compile": ["model.compile=true"],
}


# ----------------------------------------------------------------------------- measurements


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """FLOP/s of torch.mm on n x n matrices in `dtype`: the best of 5 timed batches."""
    from tuneforge.accelerator import synchronize

    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(10):
            a @ b
        synchronize(device)
        best = max(best, 10 * 2 * n**3 / (time.perf_counter() - start))
    return best


def attention_check(device: torch.device, dry: bool) -> dict:
    """Per-document SDPA and flash-attention varlen in bf16 against fp32 per-document SDPA."""
    from tuneforge.model import attention

    torch.manual_seed(0)
    lengths = [20, 5, 39, 64] if dry else [1000, 37, 2048, 1011]
    heads, kv_heads, dim = (4, 2, 16) if dry else (32, 8, 64)
    total = sum(lengths)
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    q = torch.randn(1, heads, total, dim, device=device)
    k, v = (torch.randn(1, kv_heads, total, dim, device=device) for _ in range(2))
    grad_out = torch.randn(1, total, heads, dim, device=device)
    span = dict(scaling=dim**-0.5, dropout=0.0, causal=True, window=None)

    def run(fn, dtype):
        inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = fn(*inputs)
        (out.float() * grad_out).sum().backward()
        return [out.detach().float()] + [x.grad.float() for x in inputs]

    reference = run(lambda *x: attention._sdpa_varlen(*x, bounds, **span), torch.float32)
    paths = {"sdpa_varlen": lambda *x: attention._sdpa_varlen(*x, bounds, **span)}
    flash = attention._flash_varlen_func() if device.type == "cuda" else None
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    if flash is not None:
        paths["flash_attn_varlen"] = lambda *x: attention._flash_varlen(
            flash, *x, cu, max(lengths), softcap=None, **span)
    result = {"tolerance": ATTENTION_TOL, "lengths": lengths}
    for name, fn in paths.items():
        got = run(fn, torch.bfloat16)
        errors = {part: float((g - r).abs().max() / r.abs().max())
                  for part, g, r in zip(("out", "dq", "dk", "dv"), got, reference)}
        result[name] = {"rel_errors": errors, "ok": max(errors.values()) <= ATTENTION_TOL}
    if flash is None:
        result["flash_attn_varlen"] = {"skipped": "flash_attn is not installed" if device.type == "cuda"
                                       else "needs a CUDA GPU"}
    return result


# ----------------------------------------------------------------------------- the workload


def write_workload(folder: Path, dry: bool, rows: int) -> tuple[Path, Path, int]:
    """A random Llama-shaped model (+ a tiny tokenizer) and packed-row data; (model, data, max_length)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tuneforge.data.internevo import write_internevo

    dims, max_length, _ = SHAPES["dry" if dry else "gpu"]
    model_dir = folder / "model"
    torch.manual_seed(0)
    config = LlamaConfig(**dims, max_position_embeddings=max_length, tie_word_embeddings=False)
    with torch.device("cuda" if torch.cuda.is_available() and not dry else "cpu"):
        model = LlamaForCausalLM(config).to(torch.float32 if dry else torch.bfloat16)
    model.save_pretrained(model_dir)
    del model
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(dims["vocab_size"])}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # one word per id: the vocabulary matches the model
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="t1", pad_token="t1",
                            unk_token="t0").save_pretrained(model_dir)
    rng = np.random.default_rng(0)  # long-tailed document lengths, at most one row
    lengths, target = [], rows * max_length * 0.97
    while sum(lengths) < target:
        lengths.append(int(min(max_length, max(16, rng.lognormal(np.log(max_length / 6), 0.9)))))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = rng.integers(10, dims["vocab_size"], size=int(offsets[-1]))
    data = write_internevo(SimpleNamespace(tokens=tokens, trained=np.ones_like(tokens, dtype=bool), offsets=offsets),
                           folder / "data" / "rows.bin")
    return model_dir, data, max_length


def base_config(folder: Path, model_dir: Path, data: Path, max_length: int, dry: bool, steps: int) -> Path:
    import yaml

    tree = {"model": {"path": str(model_dir), "dtype": "float32" if dry else "bfloat16", "attn_implementation": "varlen"},
            "data": {"datasets": [{"path": str(data), "format": "internevo"}], "max_length": max_length,
                     "packing": "soft", "cache_dir": str(folder / "cache")},
            "train": {"micro_batch_size": 1, "max_steps": steps, "lr": 1e-5, "warmup_ratio": 0.0, "log_every": 1},
            "parallel": {"strategy": "single"}}
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def step_rows(work: Path) -> list[dict]:
    return [r for r in (json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def throughput(rows: list[dict], warmup: int, peak: float) -> dict:
    """tokens/s and MFU over the steps after `warmup`, from metrics.jsonl rows (one per step)."""
    start = rows[warmup - 1] if warmup else {"tokens": 0, "elapsed_s": 0.0}
    timed = rows[warmup:]
    seconds = timed[-1]["elapsed_s"] - start["elapsed_s"]
    flops = sum(r["flops_per_s"] * (r["elapsed_s"] - p["elapsed_s"]) for p, r in zip([start, *timed[:-1]], timed))
    return {"tokens_per_s": (timed[-1]["tokens"] - start["tokens"]) / seconds, "mfu": flops / seconds / peak,
            "steps_timed": len(timed), "final_loss": rows[-1]["loss"]}


def train_variant(name: str, cfg_path: Path, overrides: list[str], work: Path, device: torch.device,
                  peak: float, warmup: int) -> dict:
    """Train one variant in this process; its speed, memory and the plan's estimate."""
    from tuneforge.accelerator import peak_memory_gb, release_cached_memory, reset_peak_memory
    from tuneforge.cli import main as tuneforge
    from tuneforge.config import load_config
    from tuneforge.plan import estimate, model_shape, setup_from_config

    overrides = [*overrides, f"train.work_dir={work}"]
    gc.collect()
    release_cached_memory(device)
    reset_peak_memory(device)
    baseline = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0  # what earlier runs left
    started = time.time()
    code = tuneforge(["train", str(cfg_path), *overrides])
    if code != 0:
        return {"error": f"tuneforge train exited {code}"}
    result = {"seconds": round(time.time() - started, 1), **throughput(step_rows(work), warmup, peak)}
    shutil.rmtree(work, ignore_errors=True)  # a 1.1B model's final/ is 4.4 GB: keep the disk free
    cfg = load_config(cfg_path, overrides)
    plan = estimate(model_shape(cfg.model.path), setup_from_config(cfg, 1, None))
    if device.type == "cuda":
        measured = (peak_memory_gb(device) * 2**30 - baseline) / 1e9  # GiB -> GB, as plan reports
        planned = plan["total"] - plan["overhead"]  # the CUDA context is outside max_memory_allocated
        result.update(peak_allocated_gb=measured, plan_gb=planned, plan_error=(planned - measured) / measured)
    else:
        result.update(plan_gb=plan["total"], plan_error=None)
    return result


def fsdp_resume(cfg_path: Path, folder: Path, dry: bool) -> dict:
    """FSDP2 on one rank (NCCL on a GPU, gloo in the dry run): 4 steps with a DCP checkpoint at
    step 2, then a resume from it in a second work dir; losses and weights compared."""
    from tuneforge.config import load_config
    from tuneforge.parallel.launch import LaunchEnv, free_port

    whole, resumed = folder / "fsdp_whole", folder / "fsdp_resumed"
    cfg = load_config(cfg_path, ["train.max_steps=4", "train.save_every=2", "train.keep_last=2"])
    env = LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "pytorch")
    saved_environ = dict(os.environ)  # init_distributed writes RANK, MASTER_PORT, ...: TRL must not see them
    try:
        return _fsdp_runs(cfg, env, whole, resumed)
    finally:
        os.environ.clear()
        os.environ.update(saved_environ)
        shutil.rmtree(whole, ignore_errors=True)
        shutil.rmtree(resumed, ignore_errors=True)


def _fsdp_runs(cfg, env, whole: Path, resumed: Path) -> dict:
    from safetensors.torch import load_file

    from tuneforge.parallel.launch import init_distributed
    from tuneforge.train.loop import train
    from tuneforge.train.run import build_context

    with init_distributed(env, timeout_s=600) as dist_ctx:
        backend = dist_ctx.backend
        ctx = build_context(cfg, dist_ctx, "fsdp")
        whole.mkdir()
        if train(cfg, work_dir=whole, ctx=ctx, log=lambda m: None) != 0:
            return {"error": "the uninterrupted FSDP run failed"}
        shutil.copytree(whole / "checkpoints", resumed / "checkpoints")
        for name in ("config.yaml", "metrics.jsonl"):  # the resumed run drops the rows after step 2
            shutil.copy(whole / name, resumed / name)
        ctx = build_context(cfg, dist_ctx, "fsdp")
        if train(cfg, resume=str(resumed / "checkpoints" / "step_2"), work_dir=resumed, ctx=ctx, log=lambda m: None):
            return {"error": "the resumed FSDP run failed"}
    want, got = [r["loss"] for r in step_rows(whole)], [r["loss"] for r in step_rows(resumed)]
    w_want, w_got = ({k: v for f in sorted((run / "final").glob("*.safetensors")) for k, v in load_file(f).items()}
                     for run in (whole, resumed))
    diff = max(float((w_got[k].float() - w_want[k].float()).abs().max()) for k in w_want)
    return {"backend": backend, "dcp_checkpoint": (whole / "checkpoints" / "step_2" / "dcp").is_dir(),
            "losses_whole": want, "losses_resumed": got, "max_weight_diff": diff,
            "exact": want == got and len(got) == 4 and diff == 0.0}


def trl_throughput(model_dir: Path, data: Path, max_length: int, steps: int, warmup: int, dry: bool) -> dict:
    """TRL SFTTrainer with packing (padding-free) on the same documents: tokens/s."""
    try:
        from datasets import Dataset
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import SFTConfig, SFTTrainer
    except ImportError as exc:
        return {"skipped": f"trl is not installed ({exc.name}); pip install trl"}
    from tuneforge.data.internevo import read_internevo

    encoded = read_internevo(str(data), max_length, "right", 0)
    ids = [[int(t) for t in encoded.tokens[a:b]] for a, b in zip(encoded.offsets[:-1], encoded.offsets[1:])]
    attn = "flash_attention_2" if not dry and _has_flash() else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn)
    times: list[tuple[float, int]] = []

    class Timed(SFTTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            from tuneforge.accelerator import synchronize

            out = super().training_step(model, inputs, *args, **kwargs)
            synchronize(model.device)
            times.append((time.perf_counter(), int(inputs["input_ids"].numel())))  # padding-free: no padding
            return out

    args = SFTConfig(output_dir=str(data.parent / "trl"), max_length=max_length, packing=True, packing_strategy="bfd",
                     padding_free=True, per_device_train_batch_size=1, max_steps=steps, learning_rate=1e-5,
                     bf16=not dry, use_cpu=dry, gradient_checkpointing=False, logging_steps=10**6, save_strategy="no",
                     report_to="none", disable_tqdm=True, dataset_num_proc=None)
    trainer = Timed(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}),
                    processing_class=AutoTokenizer.from_pretrained(str(model_dir)))
    trainer.train()
    timed = times[warmup:]
    tokens = sum(n for _, n in timed[1:])
    return {"tokens_per_s": tokens / (timed[-1][0] - timed[0][0]), "attn_implementation": attn, "steps": len(times)}


def _has_flash() -> bool:
    from tuneforge.model.attention import flash_attn_available

    return flash_attn_available()


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    lines = [f"gpu_check on {results['device_name']} (torch {results['torch']}{', DRY RUN' if results['dry_run'] else ''})",
             f"matmul peak ({results['peak_dtype']}): {results['matmul_peak_tflops']:.3g} TFLOP/s"]
    for name, res in results["attention"].items():
        if isinstance(res, dict) and "rel_errors" in res:
            errs = " ".join(f"{k}={v:.1e}" for k, v in res["rel_errors"].items())
            lines.append(f"attention {name:<18} {'PASS' if res['ok'] else 'FAIL'}  {errs}")
        elif isinstance(res, dict) and "skipped" in res:
            lines.append(f"attention {name:<18} skipped: {res['skipped']}")
    lines.append(f"{'variant':<14} {'tokens/s':>10} {'MFU':>7} {'peak GB':>8} {'plan GB':>8} {'plan err':>8}")
    for name, res in results["train"].items():
        if "skipped" in res or "error" in res:
            lines.append(f"{name:<14} {res.get('skipped') or res.get('error')}")
            continue
        peak = f"{res['peak_allocated_gb']:.2f}" if "peak_allocated_gb" in res else "-"
        err = f"{100 * res['plan_error']:+.1f}%" if res.get("plan_error") is not None else "-"
        lines.append(f"{name:<14} {res['tokens_per_s']:>10.0f} {100 * res['mfu']:>6.1f}% {peak:>8} "
                     f"{res['plan_gb']:>8.2f} {err:>8}")
    fsdp = results["fsdp"]
    lines.append(f"fsdp2 ({fsdp.get('backend')}) DCP save + resume: "
                 + ("EXACT" if fsdp.get("exact") else f"not exact (max weight diff {fsdp.get('max_weight_diff')})"
                    if "error" not in fsdp else fsdp["error"]))
    trl = results["trl"]
    lines.append(f"TRL SFTTrainer: {trl['skipped']}" if "skipped" in trl else
                 f"TRL SFTTrainer {trl['tokens_per_s']:.0f} tokens/s; tuneforge full_bf16 / TRL = {results['vs_trl']:.2f}x")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU acceptance check (see the module docstring)")
    parser.add_argument("--dry-run", action="store_true", help="the same plumbing on the CPU, tiny model, fp32")
    parser.add_argument("--out", default=None, help="JSON result file (default benchmarks/results/gpu_check.json)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default 12, dry 4)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU is visible (torch.cuda.is_available() is False); use --dry-run on a CPU",
              file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else RESULTS / ("gpu_check_dry_run.json" if dry else "gpu_check.json")
    steps = args.steps or (4 if dry else 12)
    warmup = 1 if dry else 3
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    peak_dtype = torch.float32 if dry else torch.bfloat16
    started = time.time()
    results = {"dry_run": dry, "torch": torch.__version__, "steps": steps, "warmup_steps": warmup,
               "train_dtype": "float32" if dry else "bfloat16",
               "device_name": "cpu" if dry else torch.cuda.get_device_name(device), "peak_dtype": str(peak_dtype)[6:]}
    peak = matmul_peak(device, peak_dtype, SHAPES["dry" if dry else "gpu"][2])
    results["matmul_peak_tflops"] = peak / 1e12
    results["attention"] = attention_check(device, dry)
    results["seconds_to_attention"] = round(time.time() - started, 1)
    folder = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    try:
        model_dir, data, max_length = write_workload(folder, dry, rows=steps + 4)
        cfg_path = base_config(folder, model_dir, data, max_length, dry, steps)
        results["train"] = {}
        for name, overrides in VARIANTS.items():
            if name == "compile" and dry:
                results["train"][name] = {"skipped": "dry run: compiling takes minutes on a CPU"}
                continue
            if name == "qlora" and not _importable("bitsandbytes"):
                results["train"][name] = {"skipped": "bitsandbytes is not installed"}
                continue
            results["train"][name] = train_variant(name, cfg_path, overrides, folder / name, device, peak, warmup)
        results["seconds_to_fsdp"] = round(time.time() - started, 1)
        results["fsdp"] = fsdp_resume(cfg_path, folder, dry)
        results["seconds_to_trl"] = round(time.time() - started, 1)
        results["trl"] = trl_throughput(model_dir, data, max_length, steps, warmup, dry)
        full = results["train"]["full_bf16"]
        results["vs_trl"] = (full["tokens_per_s"] / results["trl"]["tokens_per_s"]
                             if "tokens_per_s" in results["trl"] and "tokens_per_s" in full else None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results["seconds"] = round(time.time() - started, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"wrote {out} ({results['seconds']:.0f}s)")
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())
