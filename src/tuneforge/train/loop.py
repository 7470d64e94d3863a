"""The training loop: one function, `train`, readable top to bottom.

It builds the tokenizer, data, model (with LoRA when configured), optimizer and schedule;
resumes from a checkpoint when asked; then runs optimizer steps. Each step takes
`micro_batch_size x gradient_accumulation` rows, sums the cross-entropy of every loss token
and divides by the step's total loss-token count (token-exact: accumulation k x micro m
equals one micro-batch of k*m; preference objectives sum pair losses and divide by the step's
pair count, see `tuneforge.train.objective`). It logs metrics, evaluates, checkpoints atomically,
handles SIGTERM/SIGUSR1 and Ctrl-C (save, then exit 75 / 130; see train/stops.py), and writes
`final/` at the end (also when a stop arrives during the last step).

Every rank of a DDP/FSDP/DeepSpeed job runs this same function: `ctx` (a `LocalContext`, a
`DistributedContext` or a `DeepSpeedContext`) wraps the model, reduces counts over ranks and
hands each rank its rows, so N ranks with micro-batch m equal one process with micro-batch m*N.
Under sequence/tensor parallel (a dp x sp x tp mesh) "ranks" here are data-parallel replicas:
the sp x tp ranks of one replica get the same rows, and the wrapped module splits the work.
DeepSpeed's engine needs the optimizer at start and owns backward, clipping and the update:
`ctx.prepare`, `ctx.backward` and `ctx.optimizer_step` are those seams (plain torch elsewhere).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from tuneforge.config import dump_config
from tuneforge.errors import PREEMPTED_EXIT, UserError  # noqa: F401  PREEMPTED_EXIT: the exit code after a stop signal
from tuneforge.train.resume_contract import apply_schedule, check_same_data, data_fingerprint
from tuneforge.train.stops import StopFlag, last_step_message, stop_message


class TrainingError(UserError):
    """Training cannot go on (e.g. a non-finite loss); says where and what to look at."""

    code = 3


def train(cfg, *, resume: str | None = None, work_dir: Path, ctx, log=print) -> int:
    """Run the whole job described by `cfg` in `work_dir`; returns the process exit code."""
    from tuneforge.accelerator import peak_memory_gb
    from tuneforge.data.collate import collate_rows
    from tuneforge.data.dataset import build_data
    from tuneforge.data.samplers import RowSampler
    from tuneforge.data.summary import summary_lines
    from tuneforge.model.attention import resolve_attn_implementation
    from tuneforge.model.compile import compile_choice, compile_decoder_layers
    from tuneforge.model.load import load_model, load_tokenizer
    from tuneforge.model.lora import apply_lora, load_adapter, trainable_parameter_count
    from tuneforge.model.reward_head import as_reward_model
    from tuneforge.train import checkpoint as ckpt
    from tuneforge.train.evaluate import Evaluator
    from tuneforge.train.heap_trim import trim_heap_during_forward
    from tuneforge.train.objective import build_objective
    from tuneforge.train.metrics import MetricsLog, matmul_parameter_count, model_flop_shape, peak_flops, training_flops
    from tuneforge.train.optim import build_optimizer, build_scheduler
    from tuneforge.train.precision import compute_dtype, grad_scaler
    from tuneforge.train.progress import Progress
    from tuneforge.train.rankstats import ForwardTimer, gather_rank_stats

    tc = cfg.train
    torch.manual_seed(tc.seed)
    device = ctx.device

    # ---- data: tokenized and packed once (cached), rows assigned to this data-parallel rank
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    data = ctx.main_first(lambda: build_data(cfg, tokenizer, log=log if ctx.is_main else (lambda m: None)))
    for line in summary_lines(data.report):  # the counts check-data prints, and a warning if many were dropped
        log(line)
    eval_data = None
    if (tc.eval_every or tc.eval_at_start) and (cfg.data.eval_datasets or cfg.data.eval_split > 0):
        eval_data = ctx.main_first(lambda: build_data(cfg, tokenizer, eval_split=True))
    rows_per_step = tc.micro_batch_size * tc.gradient_accumulation
    sampler = RowSampler(data.lengths, cfg.data.sampler, rank=ctx.dp_rank, world=ctx.dp_size,
                         seed=tc.seed, batch_per_rank=rows_per_step)
    steps_per_epoch = len(sampler) // rows_per_step
    if steps_per_epoch == 0:
        raise UserError(f"the data has {len(data)} rows per epoch, fewer than one step needs "
                        f"({rows_per_step} per rank x {ctx.dp_size} ranks)",
                        hint="lower train.micro_batch_size or train.gradient_accumulation, or add data")
    total_steps = tc.max_steps or steps_per_epoch * tc.epochs

    # ---- model: mixed precision on GPU (on CPU with model.cpu_mixed_precision); else fp32
    amp_dtype = compute_dtype(cfg.model, device.type)  # None: fp32 throughout (train/precision.py)
    use_amp = amp_dtype is not None and not ctx.owns_precision  # DeepSpeed casts itself
    load_dtype = amp_dtype if (amp_dtype is not None and (cfg.model.lora or cfg.model.adapter)) else torch.float32  # frozen base
    attn = resolve_attn_implementation(cfg.model.attn_implementation, device.type)
    model = load_model(cfg.model, device=ctx.load_device, attn_implementation=attn, dtype=load_dtype)
    if tc.objective == "reward":  # the same decoder under a scalar head (model/reward_head.py)
        model = as_reward_model(model, tokenizer.pad_token_id)
    if cfg.model.lora is not None or cfg.model.adapter is not None:  # a new adapter, or one continued
        model = load_adapter(model, cfg.model.adapter) if cfg.model.adapter else apply_lora(model, cfg.model.lora)
        if cfg.model.gradient_checkpointing:
            model.enable_input_require_grads()
    shape, matmul_params = model_flop_shape(model.config), matmul_parameter_count(model)  # before any partitioning
    compile_blocks, eager_because = compile_choice(cfg, device.type, ctx.world_size, matmul_params, try_compiler=True)
    if compile_blocks:  # each decoder block, once; wrappers stay outside (tuneforge.model.compile)
        log(f"model.compile: compiling {compile_decoder_layers(model, device.type)} decoder blocks on first use "
            f"(once per run; model.compile: false skips it)")
    elif eager_because:
        log(f"model.compile: eager ({eager_because})")
    if not compile_blocks and device.type == "cpu":  # glibc keeps freed temporaries' holes (train/heap_trim.py)
        trim_heap_during_forward(model, tc.cpu_heap_trim_every, tc.cpu_heap_trim_slack)
    trainable, total_params = trainable_parameter_count(model)
    objective = build_objective(cfg, model)  # SFT's token loss or a preference loss (train/objective.py)
    trainer = ctx.wrap_model(objective)  # what forward/backward run through (DDP/FSDP)
    optimizer = build_optimizer(trainer, tc)
    scheduler = build_scheduler(optimizer, tc, total_steps)
    trainer, optimizer = ctx.prepare(trainer, optimizer)  # DeepSpeed: its engine and ZeRO optimizer
    scaler = grad_scaler(device.type, amp_dtype, ctx.owns_precision)  # float16 only
    objective.setup(trainer, ctx, [d for d in (data, eval_data) if d is not None], tokenizer.pad_token_id,
                    lambda: torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp))  # DPO: cached reference

    # ---- resume: model, optimizer, schedule, RNG and sampler position
    ckpt_root = work_dir / "checkpoints"
    step, epoch, tokens_seen = 0, 0, 0
    if resume is not None:
        folder = ckpt.resume_checkpoint(ckpt_root, resume, ctx, log)  # hashes verified; corrupt ones skipped
        state = ckpt.load_checkpoint(folder, model, optimizer, scheduler, trainer=trainer, ctx=ctx)
        apply_schedule(scheduler, tc.lr)  # the resume contract's lr rule (train/resume_contract.py)
        check_same_data(state, data, folder)
        sampler.load_state_dict(state["sampler"][ctx.dp_rank])
        if state.get("scaler"):  # float16: the loss scale and its growth tracker
            scaler.load_state_dict(state["scaler"])
        step, epoch, tokens_seen = state["step"], state["epoch"], state["tokens_seen"]
        log(f"resumed from {folder} at step {step}")

    metrics = MetricsLog(work_dir, enabled=ctx.is_main, resume_step=step if resume is not None else None)
    peak = peak_flops(device)
    if ctx.is_main:
        (work_dir / "config.yaml").write_text(dump_config(cfg))
        log(f"model {Path(cfg.model.path).name}: {total_params / 1e6:.1f}M parameters, {trainable / 1e6:.2f}M trainable; "
            f"{len(data)} rows/epoch, global batch {rows_per_step * ctx.dp_size} rows, {total_steps} steps")

    stop = StopFlag().install()  # SIGTERM/SIGUSR1/Ctrl-C: finish the step, save, stop (train/stops.py)
    progress = Progress(total_steps, step, enabled=ctx.is_main)
    evaluator = Evaluator(trainer, model, eval_data, tokenizer, cfg, ctx, device, metrics, progress, objective)
    if eval_data is not None and tc.eval_at_start and step == 0:
        evaluator.run(0)  # the starting model, logged as step 0
    started, window_tokens, window_start = time.time(), 0, time.time()
    curve: list[float] = []  # this process's step losses, for the closing summary
    forward_timer = ForwardTimer(device)  # this rank's forward time, to spot a slow rank
    trainer.train()
    while step < total_steps:
        # 1. the rows of this step (a new epoch starts when the current one runs out)
        rows = sampler.take(rows_per_step)
        if rows is None:
            epoch += 1
            sampler.set_epoch(epoch)
            continue
        micro_batches = [collate_rows([data.row(int(r)) for r in rows[i: i + tc.micro_batch_size]], tokenizer.pad_token_id)
                         for i in range(0, len(rows), tc.micro_batch_size)]
        # 2. the step's loss-token count (preference objectives: pair count) over all micro-batches
        #    and ranks normalises the loss
        rank_tokens = sum(b["num_tokens"] for b in micro_batches)
        step_loss_tokens = ctx.all_reduce_sum(sum(b["num_loss_tokens"] for b in micro_batches))
        step_items = ctx.all_reduce_sum(sum(objective.loss_items(b) for b in micro_batches))
        step_tokens = ctx.all_reduce_sum(rank_tokens)
        # 3. forward/backward each micro-batch; gradients add up to the exact mean. DDP/FSDP
        #    average gradients over data-parallel replicas, hence the factor dp_size (the
        #    sequence-parallel ranks of a replica add theirs up); they reduce only after
        #    the last micro-batch's backward (no_sync).
        loss_sum = torch.zeros((), device=device)
        forward_timer.reset()
        for index, batch in enumerate(micro_batches):
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            with ctx.no_sync(trainer, last=index == len(micro_batches) - 1):
                with forward_timer, torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=use_amp):
                    part = trainer(batch)
                ctx.backward(trainer, scaler.scale(part * (ctx.dp_size / max(step_items, 1))))
            loss_sum += part.detach()
        # 4. clip, check, step
        scaler.unscale_(optimizer)
        grad_norm = ctx.clip_grad_norm(trainer, tc.max_grad_norm)
        loss = ctx.all_reduce_sum(loss_sum) / max(step_items, 1)
        if not (math.isfinite(float(loss)) and math.isfinite(float(grad_norm))):
            ids = [s for b in micro_batches for s in b["sample_ids"]]
            if not tc.skip_nonfinite:
                progress.close()
                raise TrainingError(f"non-finite loss {float(loss)} / grad norm {float(grad_norm)} at step {step + 1}; "
                                    f"samples {ids[:8]}", hint="set train.skip_nonfinite: true to skip such steps")
            optimizer.zero_grad(set_to_none=True)
            objective.take_metrics(ctx)  # the skipped step's pair metrics do not count
            log(f"step {step + 1}: skipped (non-finite loss or gradient), samples {ids[:8]}")
            step += 1
            continue
        lr = scheduler.get_last_lr()[0]
        ctx.optimizer_step(optimizer, scaler)  # DeepSpeed already clipped and stepped in its last backward
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += step_tokens

        # 5. metrics and progress
        now = time.time()
        window_tokens += step_tokens
        sum_sq = sum(int(((b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).long() ** 2).sum()) for b in micro_batches)
        flops = training_flops(shape, matmul_params, step_tokens, step_loss_tokens, sum_sq * ctx.dp_size)
        step_time = now - window_start
        row = {"step": step, "epoch": epoch, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
               "tokens": tokens_seen, "loss_tokens": step_loss_tokens, "tokens_per_s": window_tokens / max(step_time, 1e-9),
               "elapsed_s": now - started,
               "mfu": flops / step_time / (peak * ctx.world_size) if peak else None,
               "flops_per_s": flops / step_time, "peak_mem_gb": peak_memory_gb(device),  # GiB, CUDA only
               **objective.take_metrics(ctx)}  # preference: rewards/*, logps/*
        window_tokens, window_start = 0, now
        curve.append(row["loss"])
        if step % tc.log_every == 0 or step == total_steps:
            if ctx.world_size > 1:  # per-rank forward time, tokens, memory; names a slow rank
                row.update(gather_rank_stats(ctx, forward_timer.seconds(), step_time, rank_tokens, device))
            metrics.write(row)
        progress.update(row)

        # 6. evaluation, checkpoints, preemption
        if eval_data is not None and tc.eval_every and step % tc.eval_every == 0:
            window_start += evaluator.run(step)  # eval time stays out of the next step's time and tokens/s
        stopping = ctx.all_reduce_sum(int(stop.signal is not None)) > 0  # every rank stops at the same step
        should_save = (tc.save_every and step % tc.save_every == 0) or stopping
        if should_save and step < total_steps:
            # one sampler state per data-parallel replica: ranks are numbered replica by replica
            samplers = ctx.all_gather_object(sampler.state_dict())[:: ctx.world_size // ctx.dp_size]
            state = {"step": step, "epoch": epoch, "tokens_seen": tokens_seen, "world_size": ctx.dp_size,
                     "sampler": samplers, "model_path": cfg.model.path, "data_fingerprint": data_fingerprint(data),
                     "scaler": scaler.state_dict()}
            ckpt.save_checkpoint(ckpt_root, step, model, optimizer, scheduler, state, tc.keep_last, tokenizer,
                                 trainer=trainer, ctx=ctx, template=cfg.data.template)  # every rank takes part
        if stopping and step < total_steps:  # in the last step a stop finishes the run instead
            progress.close()
            log(stop_message(stop.signal, step))
            metrics.close()
            return max(ctx.all_gather_object(stop.exit_code))

    progress.close()
    if stop.signal is not None:
        log(last_step_message(stop.signal))
    final = ckpt.save_final_model(work_dir / "final", model, tokenizer, trainer=trainer, ctx=ctx,
                                  template=cfg.data.template)
    if ctx.is_main:
        k = max(1, min(5, len(curve) // 2))
        trend = f"; loss {sum(curve[:k]) / k:.4f} -> {sum(curve[-k:]) / k:.4f} (mean of first/last {k} steps)" if curve else ""
        log(f"done: {step} steps, {tokens_seen:,} tokens in {time.time() - started:.0f}s{trend}; saved {final}")
    metrics.close()
    return 0
