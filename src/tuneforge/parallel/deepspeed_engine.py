"""DeepSpeed ZeRO as a run context: `DeepSpeedContext`, its checkpoints, final model and export.

Owns everything that touches `deepspeed` (an optional extra, imported lazily):

* `check_request`: before any rank starts, one clear line when DeepSpeed is not installed
  (with its install command), or when the request cannot work (tensor/sequence parallel, a
  JSON with its own optimizer or scheduler, stage 0, QLoRA under ZeRO-3);
* `DeepSpeedContext`: the methods of `LocalContext` (what the training loop calls) over a
  DeepSpeed engine. Collectives go to a `DistributedContext` on the same process group (no
  process-group state here; DeepSpeed keeps its own `deepspeed.comm` handle on torch's
  default group). The loop's seams:
  - `prepare(trainer, optimizer)`: `deepspeed.initialize` with our AdamW (only trainable
    parameters, so only LoRA weights carry optimizer state); returns the engine and its ZeRO
    optimizer. Our LR schedule stays ours: it updates the `param_groups` the ZeRO optimizer
    shares with the AdamW it wraps, once per optimizer step, as in one process.
  - `no_sync(engine, last)`: `set_gradient_accumulation_boundary(last)`.
  - `backward(engine, loss)`: `engine.backward(loss, scale_wrt_gas=False)` (the loop already
    divides by the step's loss tokens; `gradient_accumulation_steps` equals
    `train.gradient_accumulation`), then `engine.step()`, which at the boundary clips at
    `gradient_clipping` (= train.max_grad_norm) and updates, skipping a non-finite step.
  - `clip_grad_norm`: the global norm DeepSpeed measured in that step; `optimizer_step`: nothing.
  - `owns_precision`: DeepSpeed casts the model (bf16/fp16 sections), so no autocast or GradScaler.
* checkpoints (`save_engine_state` / `load_engine_state`): DeepSpeed's own files, written by every
  rank into `deepspeed/state/` of our temporary checkpoint folder, so tuneforge's atomic scheme
  (manifest, rename, `latest`, keep_last) applies unchanged;
* `full_model_state`: the fp32 master weights gathered from every stage (final model, adapters);
* `merged_model`: one process, no process group: a DeepSpeed checkpoint's partitioned fp32
  weights consolidated (`deepspeed.utils.zero_to_fp32`) into a plain model, which
  `tuneforge.model.export` saves as a Hugging Face folder.

On the CPU, DeepSpeed's TorchBackend would JIT-compile its shared-memory all-reduce op (about a
minute) on first use; that op only serves inference all-reduces, so `_no_shm_comm_build` marks it
unavailable and the process group's gloo does every collective.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from pathlib import Path

import torch

from tuneforge.errors import ConfigError, UserError

INSTALL = "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed"
ENGINE_DIR = "deepspeed"  # inside checkpoints/step_N/
TAG = "state"  # DeepSpeed's checkpoint tag: checkpoints/step_N/deepspeed/state/
ROOT_PREFIX = "model."  # CausalLMLoss keeps the causal LM as `.model`


def require_deepspeed() -> None:
    """Raise a one-line UserError (exit 2) when `deepspeed` cannot be imported; imports nothing."""
    try:
        found = importlib.util.find_spec("deepspeed") is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise UserError("DeepSpeed requested but not installed", hint=f"install it with: {INSTALL}")


def config_name(parallel, deepspeed: str | None) -> str:
    """The --deepspeed NAME|FILE, or for `parallel.strategy: deepspeed` the shipped config of
    `parallel.zero` / `parallel.offload`."""
    if deepspeed:
        return deepspeed
    if parallel.offload and parallel.zero == 1:
        raise ConfigError("parallel.offload needs ZeRO stage 2 or 3 with DeepSpeed (no zero1_offload config)",
                          hint="set parallel.zero: 2 or 3, or pass --deepspeed FILE.json")
    return f"zero{parallel.zero}" + ("_offload" if parallel.offload else "")


def check_request(cfg, deepspeed: str | None) -> str:
    """Fail early (before ranks start) on anything DeepSpeed cannot run; returns the config name."""
    from tuneforge.parallel.deepspeed_config import load_deepspeed_json

    require_deepspeed()
    if cfg.parallel.tensor_parallel > 1 or cfg.parallel.sequence_parallel > 1:
        raise UserError("parallel.tensor_parallel / sequence_parallel are not available with DeepSpeed",
                        hint="set them to 1, or use parallel.strategy: fsdp")
    name = config_name(cfg.parallel, deepspeed)
    _check_json(load_deepspeed_json(name), cfg, name)
    return name


def _check_json(ds: dict, cfg, name: str) -> int:
    """The ZeRO stage of the DeepSpeed config `ds`; a ConfigError for what tuneforge cannot honour."""
    for section in ("optimizer", "scheduler"):
        if section in ds:
            raise ConfigError(f"DeepSpeed config {name} sets '{section}', but tuneforge builds the optimizer and "
                              "LR schedule from train.* (lr, weight_decay, warmup_ratio, lr_scheduler)",
                              hint=f"remove '{section}' from the JSON")
    stage = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ConfigError(f"DeepSpeed config {name}: zero_optimization.stage must be 1, 2 or 3, got {stage}",
                          hint="stage 0 is plain data parallel: use parallel.strategy: ddp")
    if stage == 3 and cfg.model.quantization is not None:
        raise UserError("QLoRA (model.quantization) cannot be partitioned with DeepSpeed ZeRO-3",
                        hint="use --deepspeed zero2")
    return stage


def deepspeed_context(cfg, dist_ctx, deepspeed: str | None):
    """The `DeepSpeedContext` of this rank; with dist_ctx=None only the early checks (returns None)."""
    name = check_request(cfg, deepspeed)
    if dist_ctx is None:
        return None
    from tuneforge.parallel.deepspeed_config import resolve_deepspeed_config

    ds = resolve_deepspeed_config(name, cfg, dist_ctx.world_size, dist_ctx.device.type)
    # Our optimizer is torch's AdamW; ZeRO-Offload would otherwise insist on DeepSpeedCPUAdam,
    # a compiled op that DS_BUILD_OPS=0 installs lack. Steps are the same math either way.
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return DeepSpeedContext(dist_ctx, ds, name=Path(name).stem.removeprefix("deepspeed_"))


def _offloaded(zero: dict, part: str) -> bool:
    section = zero.get(part)
    return isinstance(section, dict) and section.get("device", "none") not in ("none", None)


def _import_deepspeed():
    """`import deepspeed`, quiet, on the right accelerator, without the CPU shm-comm JIT build."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import logging

    import deepspeed
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)  # not its config dump and per-step notes at INFO
    _no_shm_comm_build(deepspeed)
    return deepspeed


def _no_shm_comm_build(deepspeed) -> None:
    """Keep DeepSpeed's TorchBackend from JIT-compiling `deepspeed_shm_comm` on the CPU.

    `deepspeed.ops.__compatible_ops__` is DeepSpeed's per-process record of which ops may be
    built (its comment: edits to it persist); an op marked incompatible is simply not loaded,
    and training collectives go through torch.distributed as always.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


class DeepSpeedContext:
    """One rank of a DeepSpeed ZeRO job (stage 1, 2 or 3, with or without CPU offload)."""

    owns_precision = True  # DeepSpeed casts the model itself (its bf16 / fp16 sections)
    checkpoint_format = "deepspeed"

    def __init__(self, dist_ctx, ds_config: dict, *, name: str = "deepspeed"):
        from tuneforge.parallel.distributed import DistributedContext

        if not dist_ctx.initialized:
            raise ValueError("DeepSpeedContext needs a DistContext with a process group")
        self._group = DistributedContext(dist_ctx, "ddp")  # the collectives, on the same process group
        self.config = ds_config
        self.name = name
        zero = ds_config.get("zero_optimization") or {}
        self.stage = int(zero.get("stage", 0))
        self.offload = _offloaded(zero, "offload_optimizer") or _offloaded(zero, "offload_param")
        self.device = self.load_device = dist_ctx.device  # the engine moves the model to its device anyway
        self.rank = self.dp_rank = dist_ctx.rank
        self.world_size = self.dp_size = dist_ctx.world_size
        self.is_main = dist_ctx.is_main
        # ZeRO-3 partitions the parameters: every forward gathers them (a collective), and rank 0
        # cannot generate alone. (Checkpoints go through `checkpoint_format`, not DCP.)
        self.sharded = self.stage == 3
        self.engine = None

    def __repr__(self) -> str:
        precision = next((key for key in ("bf16", "fp16") if (self.config.get(key) or {}).get("enabled") is True), "fp32")
        return (f"DeepSpeedContext({self.name}: ZeRO-{self.stage}, offload {'on' if self.offload else 'off'}, "
                f"{precision}, rank {self.rank}/{self.world_size}, {self.device})")

    # ---- collectives
    def main_first(self, fn):
        return self._group.main_first(fn)

    def barrier(self) -> None:
        self._group.barrier()

    def all_reduce_sum(self, value):
        return self._group.all_reduce_sum(value)

    def all_gather_object(self, obj) -> list:
        return self._group.all_gather_object(obj)

    # ---- the model and its step
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model  # the engine wraps it in `prepare`, once the optimizer exists

    def prepare(self, trainer: torch.nn.Module, optimizer):
        """`deepspeed.initialize` over the training module and our optimizer: (engine, ZeRO optimizer)."""
        deepspeed = _import_deepspeed()
        engine, zero_optimizer, _, _ = deepspeed.initialize(model=trainer, optimizer=optimizer,
                                                            config=self.config, dist_init_required=False)
        self.engine = engine
        return engine, zero_optimizer

    def no_sync(self, model, last: bool):
        """Accumulate without an optimizer step until the step's last micro-batch (the boundary)."""
        model.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, model, loss: torch.Tensor) -> None:
        """DeepSpeed's backward (no division by the accumulation steps: the loss is already the
        step's exact share), then its step: a real optimizer step (clipped) only at the boundary."""
        model.backward(loss, scale_wrt_gas=False)
        model.step()

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """The global gradient norm DeepSpeed measured (before clipping at `gradient_clipping`,
        which is train.max_grad_norm) in the step `backward` took; inf when it skipped it."""
        norm = model.get_global_grad_norm()
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32).detach().cpu()

    def optimizer_step(self, optimizer, scaler) -> None:
        """Nothing: DeepSpeed stepped in `backward` at the accumulation boundary."""


# --------------------------------------------------------------------------- weights and checkpoints


def full_model_state(model: torch.nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    """Collective: `model`'s fp32 weights on the CPU, keyed like `model.state_dict()` (tied
    duplicates left out), on every rank. Trainable parameters come from the ZeRO optimizer's fp32
    master copy; frozen ones (ZeRO-3: gathered) and persistent buffers from the module."""
    deepspeed = _import_deepspeed()
    from deepspeed.utils import safe_get_full_fp32_param

    state = {}
    for name, param in model.named_parameters():  # the same order on every rank: collectives inside
        if trainable_only and not param.requires_grad:
            continue
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=hasattr(param, "ds_id")):
                full = param.detach().clone()
        state[name] = full.detach().float().cpu().clone()
    if not trainable_only:
        names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        for key, value in model.state_dict().items():
            if key not in names:
                state[key] = value.detach().cpu().clone()
    return state


def save_engine_state(folder: Path, engine, *, frozen_excluded: bool) -> None:
    """Collective: DeepSpeed's checkpoint of `engine` (module, ZeRO partitions, optimizer state)
    into `folder/state/`; every rank writes its own partition files. No `latest` file: tuneforge's
    checkpoint folder is the unit that is complete or absent."""
    engine.save_checkpoint(str(folder), tag=TAG, client_state={}, save_latest=False,
                           exclude_frozen_parameters=frozen_excluded)


def load_engine_state(folder: Path, engine, *, frozen_excluded: bool) -> None:
    """Collective: restore what `save_engine_state` wrote into this (freshly initialized) engine."""
    path, _ = engine.load_checkpoint(str(folder), tag=TAG, load_module_strict=not frozen_excluded,
                                     load_optimizer_states=True, load_lr_scheduler_states=False)
    if path is None:
        raise UserError(f"cannot load the DeepSpeed checkpoint in {folder}",
                        hint="resume with the DeepSpeed config the run started with")


def check_resume(state: dict, ctx, folder: Path) -> None:
    """A checkpoint of another ZeRO stage cannot be loaded: say so before DeepSpeed tries."""
    saved = state.get("zero_stage")
    if saved != ctx.stage:
        raise UserError(f"checkpoint {folder} was written by DeepSpeed ZeRO-{saved}, this run uses ZeRO-{ctx.stage}",
                        hint=f"resume with --deepspeed zero{saved} (or the JSON the run started with)")


def merged_model(ckpt_dir: str | Path) -> tuple[torch.nn.Module, dict]:
    """One process: the whole model of a DeepSpeed checkpoint (`model/` config +
    `deepspeed/state/` partitions, the fp32 master weights of every rank merged) and its state
    dict without tied duplicates, for `tuneforge.model.export` to save."""
    import io
    import warnings

    from transformers import AutoConfig

    from tuneforge.model.reward_head import auto_model_class

    require_deepspeed()
    ckpt_dir = Path(ckpt_dir)
    model_dir = ckpt_dir / "model"
    _import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    chatter = io.StringIO()  # its prints and progress bars; errors still raise
    with warnings.catch_warnings(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        warnings.filterwarnings("ignore", category=FutureWarning)
        merged = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir / ENGINE_DIR), tag=TAG)
    weights = {k.removeprefix(ROOT_PREFIX): v for k, v in merged.items()}
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)  # a checkpoint config: never remote code
    try:  # every weight is overwritten from the checkpoint: skip random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = auto_model_class(config).from_config(config, dtype=torch.float32)  # a reward model's too
    model.tie_weights()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UserError(f"the DeepSpeed checkpoint {ckpt_dir} does not fit its model config "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                        hint="a LoRA checkpoint holds the adapter in model/: export it without consolidating")
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    first = {n for n, _ in model.named_parameters()}  # tied duplicates out: loading re-ties them
    return model, {k: v for k, v in model.state_dict().items() if k in first or k not in every}

