"""Run by test_rank0_load.py under torchrun: load and shard models as the training loop does
(`load_model` on `ctx.load_device`, LoRA, `ctx.wrap_model`), and report per rank what it saw.

Usage: torchrun ... rank0_load_worker.py OUT_DIR CONFIG.yaml [CONFIG.yaml ...] writes
OUT_DIR/<config stem>.rank<R>.json per config: the load device, whether every parameter was on
the meta device before sharding, resident memory before loading and its peak until sharded
(MB), and on rank 0 the largest deviation of the sharded model from the weights on disk
(LoRA: from rank 0's own initial adapter) and of every rank's buffers from rank 0's, and the
loss and gradient norm of one fixed row, sharded and on a plain model loaded by rank 0 alone.
`--old` keeps the previous behaviour (every rank loads the full model), for comparison.
Started without torchrun it loads the model in one process (the 1-process memory figure).
"""

import json
import os
import sys
from pathlib import Path

import torch


def memory_mb() -> dict:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    except OSError:
        pass


def load_and_shard(cfg, ctx):
    from tuneforge.model.load import load_model
    from tuneforge.model.lora import apply_lora
    from tuneforge.train.loss import CausalLMLoss

    reset_peak()
    before = memory_mb()["VmRSS"]
    model = load_model(cfg.model, device=ctx.load_device, attn_implementation="sdpa", dtype="float32")
    if cfg.model.lora is not None:
        model = apply_lora(model, cfg.model.lora)
    report = {"load_device": str(ctx.load_device), "all_meta": all(p.is_meta for p in model.parameters()),
              "any_meta": any(p.is_meta for p in model.parameters()),
              "rank0_lora": {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
              if ctx.rank == 0 else {}}
    trainer = ctx.wrap_model(CausalLMLoss(model, cfg.train.loss_chunk_size))
    report.update(rss_before_mb=before, peak_mb=memory_mb()["VmHWM"],
                  tied=model.get_output_embeddings().weight is model.get_input_embeddings().weight)
    return model, trainer, report


def check_values(cfg, model, trainer, report) -> dict:
    """Rank 0: max |sharded - expected| over the weights and every rank's buffers."""
    import torch.distributed as dist
    from safetensors.torch import load_file

    from tuneforge.parallel.fsdp import full_model_state

    lora = report["rank0_lora"]
    gathered = full_model_state(trainer)  # collective; LoRA: the adapter only
    buffers = {n: b.detach().cpu() for n, b in model.named_buffers()}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, buffers)
    if dist.get_rank() != 0:
        return report
    if lora:
        expected = {k.replace(".default", ""): v for k, v in lora.items()}
        got = {k.replace(".default", ""): v for k, v in gathered.items()}
    else:
        expected = {}
        for file in Path(cfg.model.path).glob("*.safetensors"):
            expected.update(load_file(file))
        got = gathered
    assert sorted(got) == sorted(expected), (sorted(got)[:4], sorted(expected)[:4])
    report["weights_max_diff"] = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    report["weights_checked"] = len(expected)
    report["buffers"] = sorted(every[0])
    report["buffers_max_diff"] = max((float((b[k] - every[0][k]).abs().max()) for b in every[1:] for k in every[0]),
                                     default=0.0)
    return report


def check_training(cfg, ctx, trainer, lora: dict, report) -> dict:
    """One forward and backward of a fixed row on every rank (FSDP's lazy init re-pads uneven
    shards here), against the same on a plain model loaded in rank 0 alone."""
    import numpy as np
    import torch.distributed as dist

    from tuneforge.data.collate import collate_rows
    from tuneforge.model.load import load_model
    from tuneforge.model.lora import apply_lora
    from tuneforge.train.loss import CausalLMLoss

    ids = np.arange(3, 40) * 7 % 250 + 3
    batch = collate_rows([[(ids, np.ones(len(ids), dtype=bool), ("check", 0))]], pad_id=0)
    batch = {k: v.to(ctx.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = trainer(batch)
    loss.backward()
    report["loss"] = float(ctx.all_reduce_sum(loss.detach())) / ctx.world_size  # the same on every rank
    report["grad_norm"] = float(ctx.clip_grad_norm(trainer, 0.0))
    if dist.get_rank() == 0:
        reference = load_model(cfg.model, device="cpu", attn_implementation="sdpa", dtype="float32")
        if cfg.model.lora is not None:
            reference = apply_lora(reference, cfg.model.lora)
            assert not reference.load_state_dict(lora, strict=False).unexpected_keys
        ref = CausalLMLoss(reference, cfg.train.loss_chunk_size)
        want = ref({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()})
        want.backward()
        report["reference_loss"] = float(want)
        report["reference_grad_norm"] = float(torch.nn.utils.get_total_norm(
            [p.grad for p in ref.parameters() if p.grad is not None]))
    return report


def main(out_dir: str, configs: list[str], old: bool) -> int:
    from tuneforge.config import load_config
    from tuneforge.parallel.launch import init_distributed, launch_env
    from tuneforge.train.run import build_context, resolve_strategy

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if "RANK" not in os.environ:  # one process: the plain load, for the memory comparison
        from tuneforge.parallel.context import LocalContext

        for config in configs:
            cfg = load_config(config, [])
            _, _, report = load_and_shard(cfg, LocalContext(torch.device("cpu")))
            report.pop("rank0_lora")
            (out / f"{Path(config).stem}.single.json").write_text(json.dumps(report))
        return 0
    env = launch_env("pytorch", os.environ)
    with init_distributed(env, timeout_s=120) as dist_ctx:
        for config in configs:
            cfg = load_config(config, [])
            ctx = build_context(cfg, dist_ctx, resolve_strategy(cfg.parallel, env.world_size))
            if old:
                ctx.rank0_load, ctx.load_device = False, torch.device("cpu")
            model, trainer, report = load_and_shard(cfg, ctx)
            report = check_values(cfg, model, trainer, report)
            report = check_training(cfg, ctx, trainer, report.pop("rank0_lora"), report)
            (out / f"{Path(config).stem}.rank{ctx.rank}.json").write_text(json.dumps(report))
            del model, trainer
    return 0


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--old"]
    sys.exit(main(args[0], args[1:], "--old" in sys.argv))
