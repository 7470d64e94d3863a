"""Tensor parallel (Megatron-style, DTensor) for Llama-family decoder layers.

Owns `apply_tensor_parallel`: one `parallelize_module` plan per decoder layer over the
tensor-parallel mesh -
- attention: `q_proj`, `k_proj`, `v_proj` column-wise (each rank computes heads/tp query heads
  and kv_heads/tp key/value heads, so attention runs on local heads with no communication;
  the model's `view(..., -1, head_dim)` picks the local head count up by itself), `o_proj`
  row-wise (one all-reduce of the layer output);
- MLP: `gate_proj`, `up_proj` column-wise, `down_proj` row-wise (one all-reduce).
Inputs and outputs of each layer are plain, replicated tensors. Embeddings, norms and the LM
head stay replicated over the tensor-parallel ranks (simpler, and with a chunked loss the
head's logits never exist for the whole batch); FSDP shards them over the data dims like
everything else. `tuneforge.parallel.distributed.DistributedContext.wrap_model` applies this
plan, then FSDP2 over the flattened dp x sp mesh: each TP weight becomes a 2-D DTensor
(Shard(0) over data, Shard(0 or 1) over tp).

Limits: the layers must hold these projections as plain `nn.Linear` (Llama, Mistral, Qwen2/3,
InternLM2 converted to Llama, ...): LoRA-wrapped projections and fused MoE experts are refused
with a one-line error; attention heads and key/value heads must be divisible by tp
(`tuneforge.parallel.mesh.check_heads`).
"""

from __future__ import annotations

from torch import nn

from tuneforge.errors import ConfigError

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


def layer_plan() -> dict:
    """The `parallelize_module` plan of one decoder layer."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    return {**{name: ColwiseParallel() for name in COLWISE}, **{name: RowwiseParallel() for name in ROWWISE}}


def check_layers(layers: nn.ModuleList) -> None:
    """A ConfigError unless every decoder layer has the plan's projections as plain nn.Linear."""
    for index, layer in enumerate(layers):
        for name in (*COLWISE, *ROWWISE):
            module = layer.get_submodule(name) if _has(layer, name) else None
            if type(module) is not nn.Linear:
                found = "none" if module is None else f"{type(module).__module__}.{type(module).__qualname__}"
                raise ConfigError(f"parallel.tensor_parallel needs Llama-family layers with nn.Linear {name}; "
                                  f"layer {index} of this model has {found}",
                                  hint="LoRA and mixture-of-experts layers are not tensor-parallel here: set "
                                       "parallel.tensor_parallel: 1")


def _has(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


def apply_tensor_parallel(root: nn.Module, tp_mesh) -> nn.Module:
    """Shard the decoder layers of `root` (a CausalLMLoss or a causal LM) over `tp_mesh`, in place."""
    from torch.distributed.tensor.parallel import parallelize_module

    from tuneforge.train.loss import decoder_layers
    from tuneforge.parallel.mesh import check_heads, model_heads

    model = getattr(root, "model", root)
    heads, kv_heads = model_heads(model.config)
    check_heads(heads, kv_heads, tensor_parallel=tp_mesh.size())
    layers = decoder_layers(model)
    check_layers(layers)
    for layer in layers:
        parallelize_module(layer, tp_mesh, layer_plan())
    return root
