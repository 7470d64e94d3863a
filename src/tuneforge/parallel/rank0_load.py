"""Loading a model for FSDP with one copy of the weights per node: rank 0 reads, the others receive.

Without this, every FSDP rank loads the whole model on the CPU and `fully_shard` then keeps
its part, so a node briefly holds one full copy per rank (8 copies of a 70B model on an
8-GPU node). Here
1. rank 0 loads the real weights on the CPU (`tuneforge.model.load.load_model` as always);
   every other rank builds the same architecture on the meta device from `config.json`
   (`tuneforge.model.load.build_on_meta`: no weight is read or allocated), and LoRA is applied alike everywhere
   (on meta, PEFT's adapter weights are meta too);
2. `take_full_state` (all ranks, before `fully_shard`): rank 0 checks that every rank built
   the same parameters and buffers, keeps a reference to each full parameter and moves the
   parameters themselves to the meta device (ties and `requires_grad` kept), so sharding
   allocates nothing yet;
3. `fully_shard` shards the meta model on every rank (`tuneforge.parallel.fsdp.apply_fsdp`);
4. `materialize`, one parameter at a time: rank 0 scatters the full tensor
   (`distribute_tensor`), each rank receives its own shard (a new DTensor parameter in every
   slot that held the meta one, so tied embeddings stay tied; FSDP2 re-registers and pads it
   at its lazy init) and rank 0 drops its full copy. Buffers are not sharded by FSDP: rank
   0's real buffers (non-persistent ones such as the rotary `inv_freq` included, which no
   state dict holds) are broadcast into the meta buffers of the others. Every value, LoRA's
   initial adapter weights included, is thus rank 0's: nothing relies on equal random
   streams. Last, rank 0's RNG states are copied to every rank, as if each had loaded the
   model itself (same seed, same calls: same state).

Peak host memory: rank 0 holds the full model plus one shard of one parameter at a time
(its own shards replace its full tensors as they go); a rank > 0 holds its shards (plus, on
a GPU, an unwritten full-size buffer of the parameter being received). Parameters are
assumed to be FSDP2 DTensors on a 1-D mesh (`Shard(0)`), which is what `apply_fsdp` makes
without tensor parallel; under tensor parallel (2-D shards) every rank still loads the full
model (`DistributedContext.rank0_load` is False there).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from tuneforge.errors import UserError


@dataclass
class FullState:
    """Rank 0's full parameters (by name, as `root.named_parameters()` lists them); the
    entries are dropped as `materialize` sends them. Empty on ranks > 0."""

    params: dict[str, torch.Tensor] = field(default_factory=dict)


def _layout(root: nn.Module) -> list[tuple[str, str, tuple[int, ...], str]]:
    return ([("param", n, tuple(p.shape), str(p.dtype)) for n, p in root.named_parameters()]
            + [("buffer", n, tuple(b.shape), str(b.dtype)) for n, b in root.named_buffers()])


def take_full_state(root: nn.Module) -> FullState:
    """Collective, before `fully_shard`: check that all ranks built the same model, and on
    rank 0 keep the full parameters aside and leave `root`'s parameters on the meta device."""
    mine = _layout(root)
    theirs = [mine if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(theirs, src=0)
    if theirs[0] != mine:
        diff = next((f"{a} vs rank 0's {b}" for a, b in zip(mine, theirs[0]) if a != b),
                    f"{len(mine)} tensors vs rank 0's {len(theirs[0])}")
        raise UserError(f"rank {dist.get_rank()} built another model from model.path than rank 0 loaded: {diff}",
                        hint="every node must see the same model folder")
    state = FullState()
    if dist.get_rank() == 0:
        slots = _slots(root, "_parameters")
        for name, param in list(root.named_parameters()):  # each shared (tied) parameter once
            if param.is_meta:
                raise RuntimeError(f"rank 0 must hold the real weights, but {name} is on the meta device")
            state.params[name] = param.detach()
            meta = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
            for module, attr in slots[id(param)]:  # every slot of a tied parameter: ties stay
                module._parameters[attr] = meta
    return state


def _slots(root: nn.Module, kind: str) -> dict[int, list[tuple[nn.Module, str]]]:
    """id(tensor) -> every (module, attribute) holding it in `module._parameters` / `._buffers`."""
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in root.modules():
        for attr, tensor in getattr(module, kind).items():
            if tensor is not None:
                slots.setdefault(id(tensor), []).append((module, attr))
    return slots


@torch.no_grad()
def materialize(root: nn.Module, full: FullState, device: torch.device, *, offload: bool = False) -> None:
    """Collective, after `fully_shard`: give every rank its real shards (and buffers) from rank 0.

    `device` is the compute device (where broadcasts run and buffers live); shards go there,
    or to the CPU with `offload`."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    rank0 = dist.get_rank() == 0
    shard_device = torch.device("cpu") if offload else device
    slots = _slots(root, "_parameters")
    for name, param in list(root.named_parameters()):
        if not isinstance(param, DTensor):
            raise RuntimeError(f"{name} is not sharded by FSDP ({type(param).__name__}); cannot load it from rank 0")
        if rank0:
            tensor = full.params.pop(name).to(device).contiguous()
        else:  # only its shape and dtype are read (its pages are never written on the CPU)
            tensor = torch.empty(param.shape, dtype=param.dtype, device=device)
        # rank 0 (coordinate 0 of the 1-D FSDP mesh) scatters: each rank receives only its shard
        local = distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=0).to_local()
        local = torch.empty_like(local, device=shard_device).copy_(local)  # own storage: the full tensor can go
        new = nn.Parameter(DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                                              shape=param.shape, stride=param.stride()),
                           requires_grad=param.requires_grad)
        for module, attr in slots[id(param)]:
            module._parameters[attr] = new
        del tensor, local
    if full.params:
        raise RuntimeError(f"rank 0 kept weights no parameter took: {sorted(full.params)[:3]}")
    buffer_slots = _slots(root, "_buffers")
    for _, buffer in list(root.named_buffers()):  # each shared buffer once, in the same order everywhere
        if rank0:
            tensor = buffer.to(device).contiguous()
        else:
            tensor = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
        dist.broadcast(tensor, src=0)
        for module, attr in buffer_slots[id(buffer)]:
            module._buffers[attr] = tensor
    _copy_rng_from_rank0(device)


def _copy_rng_from_rank0(device: torch.device) -> None:
    """Every rank continues with rank 0's RNG states: the streams each rank had after loading
    the model itself (the meta build consumes no random numbers, rank 0's load does)."""
    states = [(torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
              if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(states, src=0)
    cpu_state, device_state = states[0]
    torch.set_rng_state(cpu_state)
    if device_state is not None:
        torch.cuda.set_rng_state(device_state, device)
