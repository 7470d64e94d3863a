"""FSDP2: sharding the training module, and its sharded and consolidated state dicts.

Owns
- `apply_fsdp`: the one place `fully_shard` is applied: each decoder layer, then the root (the
  `CausalLMLoss` module, so the embeddings, final norm and LM head are gathered once per
  forward). `zero: 3` reshards parameters after forward (FULL_SHARD), `zero: 2` keeps them
  gathered until backward (SHARD_GRAD_OP). `offload` keeps the shards, gradients and optimizer
  step on the CPU (`pin_memory` only where CUDA exists). A `param_dtype` (GPU only) computes in
  that dtype and reduces gradients in fp32. Under tensor parallel the decoder layers hold
  DTensors on the tp mesh already and `mesh` is the flattened dp x sp mesh, so FSDP2 makes 2-D
  shards; under sequence parallel `gradient_divide_factor` (dp) sums the sp ranks' gradients
  and averages over replicas only (with sum-only collectives, which gloo and NCCL both have).
  With `from_rank0` only rank 0 holds real weights (the others a meta-device model) and every
  rank's shards come from rank 0 (`tuneforge.parallel.rank0_load`).
- `save_sharded` / `load_sharded`: model (trainable parameters only for LoRA) and optimizer
  state through torch.distributed.checkpoint (DCP); every rank writes its own shards, and a
  checkpoint can be read back on any number of ranks.
- `full_model_state`: the whole (or trainable) model gathered on rank 0, for `final/`.
- `consolidate` / `consolidated_model`: one process, no process group: load a DCP checkpoint's
  model weights into a plain model (what `tuneforge export` of an FSDP checkpoint saves).

State-dict keys are those of the `CausalLMLoss` root, i.e. the causal LM's keys prefixed with
`model.`; `ROOT_PREFIX` strips them back.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import UserError

ROOT_PREFIX = "model."  # CausalLMLoss keeps the causal LM as `.model`


def apply_fsdp(root: nn.Module, mesh, *, zero: int = 3, offload: bool = False,
               param_dtype: torch.dtype | None = None, gradient_divide_factor: float | None = None,
               from_rank0: torch.device | None = None) -> nn.Module:
    """Shard `root` (a CausalLMLoss) in place with FSDP2 and return it.

    `from_rank0` (the compute device): rank 0 holds the real weights and the other ranks a
    meta-device model; every rank gets its shards from rank 0 (`tuneforge.parallel.rank0_load`)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from tuneforge.train.loss import decoder_layers

    kwargs = {"mesh": mesh, "reshard_after_forward": zero == 3}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    if param_dtype is not None and param_dtype != torch.float32:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    layers = list(decoder_layers(root.model, purpose="shard with FSDP", hint="use parallel.strategy: ddp"))
    if from_rank0 is not None:
        from tuneforge.parallel import rank0_load

        full = rank0_load.take_full_state(root)  # rank 0: the weights set aside, the model on meta
    for layer in layers:
        fully_shard(layer, **kwargs)
    fully_shard(root, **kwargs)
    if from_rank0 is not None:
        rank0_load.materialize(root, full, from_rank0, offload=offload)
    if gradient_divide_factor is not None:
        for module in (*layers, root):
            module.set_gradient_divide_factor(float(gradient_divide_factor))
            module.set_force_sum_reduction_for_comms(True)  # no PREMUL_SUM (NCCL only): sum, then divide
    return root


def _trainable_only(root: nn.Module) -> bool:
    return any(not p.requires_grad for p in root.parameters())


def _options(root: nn.Module, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    frozen = _trainable_only(root)  # LoRA: the frozen base is in model.path already
    return StateDictOptions(ignore_frozen_params=frozen, strict=not frozen, **extra)


def save_sharded(folder: Path, root: nn.Module, optimizer) -> None:
    """Collective: write the model and optimizer shards of every rank to `folder` (DCP)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(root, optimizer, options=_options(root))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))


def load_sharded(folder: Path, root: nn.Module, optimizer) -> None:
    """Collective: restore what `save_sharded` wrote, resharding to this job's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    options = _options(root)
    model_state, optim_state = get_state_dict(root, optimizer, options=options)
    state = {"model": model_state, "optim": optim_state}
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except Exception as exc:  # DCP raises CheckpointException listing each rank's failure
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the sharded checkpoint {folder}: {first[:300]}",
                        hint="resume with the model and LoRA settings the run started with") from exc
    result = set_state_dict(root, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                            options=options)
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    missing = [k for k in getattr(result, "missing_keys", []) if k in trainable]
    if missing or getattr(result, "unexpected_keys", []):
        raise UserError(f"the sharded checkpoint {folder} does not fit this model (missing {missing[:3]}, "
                        f"unexpected {list(result.unexpected_keys)[:3]})")


def full_model_state(root: nn.Module) -> dict[str, torch.Tensor]:
    """Collective: the model's full (for LoRA: trainable) state on CPU, keyed like the causal
    LM itself; complete on rank 0, empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(root, options=_options(root, full_state_dict=True, cpu_offload=True))
    return {k.removeprefix(ROOT_PREFIX): v for k, v in without_shared(root, state).items()}


def without_shared(module: nn.Module, state: dict) -> dict:
    """`state` without the keys of parameters shared with an earlier key (tied input/output
    embeddings): gathered or loaded copies are no longer shared, and loading re-ties them."""
    seen, repeats = set(), set()
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            repeats.add(name)
        seen.add(id(param))
    return {k: v for k, v in state.items() if k not in repeats}


def consolidate(dcp_dir: Path, model: nn.Module) -> None:
    """Load the model weights of the DCP checkpoint in `dcp_dir` into the plain `model` (one process)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    saved = set(dcp.FileSystemReader(str(dcp_dir)).read_metadata().state_dict_metadata)
    wanted = {f"{ROOT_PREFIX}{k}": v for k, v in model.state_dict().items()}
    present = {k: v for k, v in wanted.items() if f"model.{k}" in saved}  # DCP flattens {"model": {...}}
    missing = [k.removeprefix(ROOT_PREFIX) for k in wanted if k not in present]
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in missing if k not in tied]
    if missing:
        raise UserError(f"the sharded checkpoint {dcp_dir} lacks {len(missing)} weights of this model ({missing[:3]})",
                        hint="a LoRA checkpoint holds only the adapter: export it without consolidating")
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is the intent here
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": present}, checkpoint_id=str(dcp_dir), no_dist=True)


def consolidated_model(ckpt_dir: str | Path) -> tuple[nn.Module, dict]:
    """One process: the whole model of an FSDP checkpoint (`model/` config + `dcp/` shards) and
    its state dict without tied duplicates, for `tuneforge.model.export` to save."""
    from transformers import AutoConfig

    from tuneforge.model.reward_head import auto_model_class

    ckpt_dir = Path(ckpt_dir)
    model_dir = ckpt_dir / "model"
    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)  # a checkpoint config: never remote code
    try:  # every weight is overwritten from the checkpoint: skip random initialisation
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        from contextlib import nullcontext as no_init_weights
    with no_init_weights():
        model = auto_model_class(config).from_config(config, dtype=torch.float32)  # a reward model's too
    model.tie_weights()  # skipped with the initialisation; the config may tie input and output embeddings
    consolidate(ckpt_dir / "dcp", model)
    return model, without_shared(model, model.state_dict())
