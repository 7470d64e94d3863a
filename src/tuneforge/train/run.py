"""`tuneforge train`: start the processes, prepare the work dir and the run context, run the loop.

Launching (see `tuneforge.parallel.launch`):
- `NPROC_PER_NODE=N [NNODES= NODE_RANK= ADDR= PORT=] tuneforge train ...` re-runs the same
  command under torchrun (`relaunch_with_torchrun`) and returns its exit status;
- under torchrun (`--launcher pytorch`, or detected from RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR)
  this process joins the job; `--launcher slurm` reads SLURM's variables (`env_from_slurm`),
  `--launcher mpi` Open MPI's (`env_from_mpi`, under mpirun);
- the process group is nccl on GPUs, gloo on the CPU (`init_distributed`).

Strategy (`parallel.strategy`), decided by `resolve_strategy`:
- `auto`: one process -> `single`; several -> `fsdp` when `parallel.zero` is 2 or 3 (the default
  3 is FULL_SHARD: parameters, gradients and optimizer state sharded, the most memory saved;
  2 keeps parameters gathered between forward and backward), `ddp` when it is 1 (FSDP has no
  optimizer-state-only sharding; DDP replicates everything and is the fastest for models that
  fit). `--deepspeed NAME` selects DeepSpeed (`tuneforge.parallel.deepspeed_engine`).
- `single`, `ddp`, `fsdp`, `deepspeed`: as named; `ddp`/`fsdp` with one process run `single`.
  `parallel.offload` (FSDP) keeps shards and the optimizer step on the CPU.
- `deepspeed`: ZeRO from the --deepspeed NAME|FILE.json, else from `parallel.zero` and
  `parallel.offload` (`zero3_offload`, ...). One process without a launcher still gets a
  process group (of one rank), which DeepSpeed needs.
- `parallel.sequence_parallel` / `parallel.tensor_parallel` > 1: a dp x sp x tp mesh
  (`tuneforge.parallel.mesh`) under FSDP; sp x tp must divide the world size (checked here,
  before any rank starts).

Owns the work-dir rules: a dir that already holds a run is refused unless `--resume`
(continue it, with a config that keeps the resume contract) or `--force` (start over,
clearing its checkpoints, metrics and final model once the new run's inputs passed their
checks). In a job only rank 0 locks, checks and clears it; the lock is held until the run ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.parallel.mesh import check_model_for_mesh
from tuneforge.train.workdir_lock import LOCK_HELD_ENV, work_dir_lock

RUN_FILES = ("checkpoints", "final", "metrics.jsonl", "tensorboard")


def prepare_work_dir(cfg, work_dir: Path, resume: str | None, force: bool) -> None:
    """Check that `work_dir` may be used for this run, clearing it under --force (the caller
    holds the work-dir lock). On --resume the config must keep the resume contract
    (train/resume_contract.py); --force clears only after the new run's inputs passed every
    check that can be made before training (train/preflight.py)."""
    from tuneforge.train.resume_contract import check_resume_contract

    saved = work_dir / "config.yaml"
    holds_run = saved.is_file() and any((work_dir / name).exists() for name in RUN_FILES)
    if resume is not None:
        if resume == "latest" and not (work_dir / "checkpoints").is_dir():
            raise UserError(f"--resume: {work_dir} holds no checkpoints", hint="start without --resume")
        source = Path(resume).parent.parent / "config.yaml" if resume != "latest" else saved
        check_resume_contract(cfg, source if source.is_file() else saved)
        return
    if holds_run and not force:
        raise UserError(f"{work_dir} already holds a run", hint="continue it with --resume, start over with --force, "
                        "or set train.work_dir")
    if holds_run and force:
        from tuneforge.train.preflight import check_run_inputs

        check_run_inputs(cfg)  # a typo must not cost the old run
        for name in RUN_FILES:
            path = work_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def resolve_strategy(parallel, world_size: int, deepspeed: str | None = None) -> str:
    """'single' | 'ddp' | 'fsdp' | 'deepspeed' for `parallel` (the config section) on `world_size` ranks."""
    requested = parallel.strategy
    if deepspeed is not None:
        if requested not in ("auto", "deepspeed"):
            raise UserError(f"--deepspeed {deepspeed} conflicts with parallel.strategy: {requested}",
                            hint="drop one of them")
        return "deepspeed"
    if requested == "deepspeed":
        return "deepspeed"
    if parallel.tensor_parallel > 1 or parallel.sequence_parallel > 1:  # a dp x sp x tp mesh under FSDP
        from tuneforge.parallel.mesh import mesh_shape

        mesh_shape(world_size, parallel.sequence_parallel, parallel.tensor_parallel)  # sp x tp must divide the world
        if requested == "ddp" or (requested == "auto" and parallel.zero == 1):
            raise UserError("parallel.sequence_parallel and parallel.tensor_parallel > 1 need FSDP",
                            hint="use parallel.strategy: fsdp with parallel.zero 2 or 3")
    if requested == "fsdp" and parallel.zero == 1:
        raise UserError("FSDP shards gradients and parameters: parallel.zero must be 2 or 3 with strategy fsdp",
                        hint="use parallel.strategy: ddp, or DeepSpeed (--deepspeed zero1) for optimizer-state sharding")
    if world_size == 1:
        return "single"
    if requested == "single":
        raise UserError(f"parallel.strategy: single runs one process, but this job has {world_size}",
                        hint="use parallel.strategy: auto, ddp or fsdp, or start one process")
    if requested == "auto":
        return "fsdp" if parallel.zero in (2, 3) else "ddp"
    return requested


def deepspeed_context(cfg, dist_ctx, deepspeed: str | None):
    """Hook for DeepSpeed: a context offering LocalContext's methods over a DeepSpeed engine
    (`deepspeed` is the --deepspeed NAME|FILE.json, None for `parallel.strategy: deepspeed`).
    Called with dist_ctx=None before a NPROC_PER_NODE relaunch, to fail before starting ranks."""
    from tuneforge.parallel.deepspeed_engine import deepspeed_context as build

    return build(cfg, dist_ctx, deepspeed)


def build_context(cfg, dist_ctx, strategy: str, deepspeed: str | None = None):
    """The run context for `strategy` on the process group of `dist_ctx` (a launch.DistContext)."""
    import torch

    from tuneforge.parallel.context import LocalContext

    if strategy == "single":
        return LocalContext(dist_ctx.device)
    if strategy == "deepspeed":
        return deepspeed_context(cfg, dist_ctx, deepspeed)
    from tuneforge.parallel.distributed import DistributedContext

    from tuneforge.train.precision import compute_dtype

    param_dtype = compute_dtype(cfg.model, dist_ctx.device.type)  # None: fp32 (FSDP2 MixedPrecisionPolicy otherwise)
    if strategy == "fsdp":
        if cfg.model.quantization is not None:
            raise UserError("QLoRA (model.quantization) cannot be sharded with FSDP here", hint="use parallel.strategy: ddp")
        if param_dtype == torch.float16:
            raise UserError("FSDP training in float16 is not supported (its loss scaling needs sharded gradients)",
                            hint="use model.dtype: bfloat16")
    return DistributedContext(dist_ctx, strategy, zero=cfg.parallel.zero, offload=cfg.parallel.offload,
                              param_dtype=param_dtype, sequence_parallel=cfg.parallel.sequence_parallel,
                              tensor_parallel=cfg.parallel.tensor_parallel)


def run_train(cfg, args) -> int:
    from tuneforge.parallel.launch_env import launch_env
    from tuneforge.parallel.process_group import init_distributed
    from tuneforge.parallel.relaunch import relaunch_with_torchrun, spawn_request

    if args.work_dir:
        cfg.train.work_dir = args.work_dir
    if not cfg.data.datasets:
        raise UserError("data.datasets is empty", hint="add at least one {path, format} entry")
    work_dir = Path(cfg.train.work_dir)
    deepspeed = getattr(args, "deepspeed", None)

    plan = spawn_request(os.environ)
    if plan is not None:  # NPROC_PER_NODE=N: run this same command as N ranks under torchrun
        # config errors once, here, rather than from every rank
        if resolve_strategy(cfg.parallel, plan.nproc_per_node * plan.nnodes, deepspeed) == "deepspeed":
            deepspeed_context(cfg, None, deepspeed)
        check_model_for_mesh(cfg.model, cfg.parallel)  # heads vs sequence/tensor parallel
        argv = getattr(args, "argv", None)
        if argv is None:
            raise UserError("cannot relaunch: the command line is unknown", hint="start with torchrun instead")
        with contextlib.ExitStack() as held:
            environ = dict(os.environ)
            if plan.node_rank == 0:  # this parent holds the work-dir lock for the whole job
                held.enter_context(work_dir_lock(work_dir))
                prepare_work_dir(cfg, work_dir, args.resume, args.force)
                environ[LOCK_HELD_ENV] = str(work_dir.resolve())
            if plan.note:
                print(plan.note, file=sys.stderr)
            return relaunch_with_torchrun(plan, argv, environ=environ)

    from tuneforge.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT
    from tuneforge.parallel.relaunch import PREEMPT_MARKER_ENV
    from tuneforge.quiet import quiet_libraries  # torch and transformers: not in a relaunching parent
    from tuneforge.train.loop import train
    from tuneforge.train.stops import signal_handlers_restored

    env = launch_env(getattr(args, "launcher", None), os.environ)
    strategy = resolve_strategy(cfg.parallel, env.world_size, deepspeed)
    check_model_for_mesh(cfg.model, cfg.parallel)
    if strategy == "deepspeed":
        deepspeed_context(cfg, None, deepspeed)  # fail before joining a process group
        if env.launcher == "none":  # DeepSpeed needs a process group, even of one rank
            from tuneforge.parallel.launch_env import LaunchEnv
            from tuneforge.parallel.relaunch import free_port

            env = LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "pytorch")
    quiet_libraries()
    with init_distributed(env, timeout_s=cfg.parallel.timeout_s) as dist_ctx, contextlib.ExitStack() as held:
        ctx = build_context(cfg, dist_ctx, strategy, deepspeed)
        # rank 0 locks, checks (and under --force clears) the work dir; the others follow its verdict
        error = None
        if ctx.is_main:
            try:
                held.enter_context(work_dir_lock(work_dir))
                prepare_work_dir(cfg, work_dir, args.resume, args.force)
            except UserError as exc:
                error = exc
        verdict = ctx.all_gather_object(None if error is None else str(error))[0]
        if error is not None:
            raise error
        if verdict is not None:
            return UserError.code  # rank 0 reports it
        log = (lambda m: print(m, file=sys.stderr)) if ctx.is_main else (lambda m: None)
        if env.world_size > 1 or strategy == "deepspeed":
            detail = f" (zero {ctx.zero}, offload {'on' if ctx.offload else 'off'})" if strategy == "fsdp" else ""
            if strategy == "deepspeed":
                detail = f" {ctx.name} (ZeRO-{ctx.stage}, offload {'on' if ctx.offload else 'off'})"
            if getattr(ctx, "multi_dim", False):
                detail += f", mesh {ctx.shape}"
            log(f"{strategy}{detail} on {env.world_size} rank{'s' if env.world_size > 1 else ''}, {dist_ctx.backend} on {dist_ctx.device.type}")
            if strategy == "fsdp" and cfg.train.eval_prompts:
                log("note: train.eval_prompts are not generated under FSDP (eval loss still is)")
        elif cfg.parallel.strategy in ("ddp", "fsdp"):
            log(f"note: parallel.strategy {cfg.parallel.strategy} with one process: training as a single process")
        try:
            with signal_handlers_restored():
                code = train(cfg, resume=args.resume, work_dir=work_dir, ctx=ctx, log=log)
            marker = os.environ.get(PREEMPT_MARKER_ENV)
            if code in (PREEMPTED_EXIT, INTERRUPTED_EXIT) and marker:  # a NPROC_PER_NODE parent reports it;
                if ctx.is_main:  # torchrun sees a clean exit and prints no failure report
                    Path(marker).write_text(str(code))
                return 0
            return code
        except RuntimeError as exc:  # a collective failed: name the rank that died or hangs
            lost = dist_ctx.lost_peer_error(exc)
            if lost is None:
                raise
            raise lost from exc
