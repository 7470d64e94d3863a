"""`DistributedContext`: the run context of one rank in a data-parallel job (DDP or FSDP2).

It offers the methods of `LocalContext` (what the training loop calls) over the process group
that `tuneforge.parallel.process_group.init_distributed` created, handed in as its `DistContext`;
there is no process-group state here beyond what torch.distributed itself keeps.

* `main_first(fn)`: rank 0 runs `fn` (tokenizing and packing into the data cache) while the
  others wait on `long_barrier`, which has no timeout, then the others run `fn` and hit the cache.
* `all_reduce_sum`: python ints and floats (summed as int64 / float64) and tensors.
* `wrap_model`: DDP, or FSDP2 through `tuneforge.parallel.fsdp.apply_fsdp` (the one place
  `fully_shard` is applied).
* `no_sync(model, last)`: gradient accumulation without communication until the last
  micro-batch: DDP's `no_sync()`, FSDP2's `set_requires_gradient_sync(False)`. The forward
  AND backward of a micro-batch must run inside it.
* `clip_grad_norm`: the global norm. FSDP2 gradients are DTensors sharded over ranks: the
  local shards' squared norms are summed over ranks before clipping.
* `sharded`: True under FSDP; checkpoints then go through torch.distributed.checkpoint.

With `parallel.sequence_parallel` / `parallel.tensor_parallel` > 1 the ranks form a
`tuneforge.parallel.mesh.ParallelMesh` (dp x sp x tp): `dp_rank`/`dp_size` name this rank's
data-parallel replica (the samplers' rank and world: every rank of a replica gets the same
rows). `wrap_model` applies the tensor-parallel plan (`tuneforge.parallel.tensor_parallel`),
switches to Ulysses attention and the sharding `SequenceParallelLoss`
(`tuneforge.parallel.sequence_parallel`), then FSDP2 over the flattened dp x sp ranks (SP and
TP need FSDP). The training module returns the same loss sum on every rank of a replica, so
`all_reduce_sum` sums over dp, then takes the max over the replica's sp x tp ranks (equal
values stay; a flag such as a stop signal raised on one rank reaches the others). FSDP sums
the gradients of the sp ranks of one replica (each differentiates its own tokens) and averages
over the dp replicas only (`gradient_divide_factor`), so the loop's `ctx.dp_size` factor
holds. `clip_grad_norm` counts each gradient element once, whether its DTensor is sharded or
replicated over a mesh dim (or not on this rank's mesh dim at all, as the replicated
embeddings, norms and LM head under TP).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from tuneforge.errors import UserError
from tuneforge.parallel.mesh import mesh_shape

STRATEGIES = ("ddp", "fsdp")


class DistributedContext:
    """One rank of a DDP or FSDP2 job; every rank is a data-parallel rank."""

    owns_precision = False  # autocast and GradScaler are the loop's (see LocalContext)

    def __init__(self, dist_ctx, strategy: str, *, zero: int = 3, offload: bool = False,
                 param_dtype: torch.dtype | None = None, sequence_parallel: int = 1, tensor_parallel: int = 1):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not dist_ctx.initialized:
            raise ValueError("DistributedContext needs a DistContext with a process group")
        if strategy == "fsdp" and zero not in (2, 3):
            raise UserError(f"FSDP shards gradients and parameters: parallel.zero must be 2 or 3, got {zero}",
                            hint="use parallel.strategy: ddp, or --deepspeed zero1 for optimizer-state sharding only")
        self.dist = dist_ctx
        self.strategy = strategy
        self.zero = zero
        self.offload = offload
        self.param_dtype = param_dtype  # FSDP2 MixedPrecisionPolicy on GPU; None keeps the parameters' dtype
        self.device = dist_ctx.device
        self.rank = dist_ctx.rank
        self.world_size = dist_ctx.world_size
        self.shape = mesh_shape(self.world_size, sequence_parallel, tensor_parallel)
        if (self.shape.sp > 1 or self.shape.tp > 1) and strategy != "fsdp":
            raise UserError("parallel.sequence_parallel and parallel.tensor_parallel > 1 need FSDP",
                            hint="use parallel.strategy: fsdp (or auto with parallel.zero 2 or 3)")
        self.dp_rank, self.sp_rank, self.tp_rank = self.shape.coordinates(self.rank)
        self.dp_size, self.sp_size, self.tp_size = self.shape.dp, self.shape.sp, self.shape.tp
        self.is_main = dist_ctx.is_main
        self.sharded = strategy == "fsdp"
        # FSDP2 moves each layer to the device as it shards it, so the full model is loaded on
        # the CPU and never sits whole on one GPU; DDP replicates it on every device. Under
        # FSDP only rank 0 reads the weights; the others build the model on the meta device
        # and receive their shards from rank 0 (tuneforge.parallel.rank0_load). Tensor
        # parallel (2-D shards) still loads the full model on every rank.
        self.rank0_load = self.sharded and self.tp_size == 1
        self.load_device = (torch.device("meta") if self.rank0_load and self.rank > 0 else torch.device("cpu")) \
            if self.sharded else self.device
        self._mesh = None
        self._parallel_mesh = None

    @property
    def multi_dim(self) -> bool:
        """True when sequence or tensor parallel is on (a dp x sp x tp mesh instead of dp alone)."""
        return self.sp_size > 1 or self.tp_size > 1

    def __repr__(self) -> str:
        extra = f", zero={self.zero}, offload={self.offload}" if self.sharded else ""
        if self.multi_dim:
            extra += f", mesh {self.shape}"
        return f"DistributedContext({self.strategy}, rank {self.rank}/{self.world_size}, {self.device}{extra})"

    @property
    def mesh(self):
        """The 1-D data-parallel DeviceMesh over all ranks (built on first use)."""
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            self._mesh = init_device_mesh(self.device.type, (self.world_size,), mesh_dim_names=("dp",))
        return self._mesh

    @property
    def parallel_mesh(self):
        """The dp x sp x tp `ParallelMesh` (built on first use), or None without SP/TP."""
        if self._parallel_mesh is None and self.multi_dim:
            from tuneforge.parallel.mesh import build_mesh

            self._parallel_mesh = build_mesh(self.device.type, self.shape)
        return self._parallel_mesh

    # ---- collectives
    def main_first(self, fn):
        """Rank 0 runs `fn` first (e.g. builds a cache), then the others; every rank gets fn()."""
        from tuneforge.parallel.process_group import long_barrier

        # Each waiting rank polls the store; ~20 polls/s in all keeps the wait short on a few
        # ranks and the store (on rank 0's host) unloaded on many.
        poll_s = min(5.0, 0.05 * self.world_size)
        if self.is_main:
            result = fn()
            long_barrier(self.dist, poll_s)
            return result
        long_barrier(self.dist, poll_s)
        return fn()

    def barrier(self) -> None:
        self.dist.barrier()

    def all_reduce_sum(self, value):
        """Sum over ranks of an int, a float or a tensor (returned as the same kind)."""
        if torch.is_tensor(value):
            out = value.detach().clone()
            self._sum_over_data(out)
            return out
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"all_reduce_sum takes an int, a float or a tensor, not {type(value).__name__}")
        dtype = torch.int64 if isinstance(value, int) else torch.float64
        out = torch.tensor(value, dtype=dtype, device=self.device)
        self._sum_over_data(out)
        return type(value)(out.item())

    def _sum_over_data(self, out: torch.Tensor) -> None:
        if not self.multi_dim:
            dist.all_reduce(out)
            return
        mesh = self.parallel_mesh
        if self.dp_size > 1:
            dist.all_reduce(out, group=mesh.dp_group)
        dist.all_reduce(out, op=dist.ReduceOp.MAX, group=mesh.replica_group)

    def all_gather_object(self, obj) -> list:
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    # ---- the model
    def wrap_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.sharded:
            from tuneforge.parallel.fsdp import apply_fsdp

            if not self.multi_dim:
                return apply_fsdp(model, self.mesh, zero=self.zero, offload=self.offload, param_dtype=self.param_dtype,
                                  from_rank0=self.device if self.rank0_load else None)
            from tuneforge.parallel.mesh import check_heads, model_heads
            from tuneforge.parallel.tensor_parallel import apply_tensor_parallel

            check_heads(*model_heads(model.model.config), self.sp_size, self.tp_size)
            mesh = self.parallel_mesh
            if self.tp_size > 1:
                apply_tensor_parallel(model, mesh.tp)
            if self.sp_size > 1:
                from tuneforge.parallel import sequence_parallel as ulysses

                ulysses.use_ulysses_attention(model.model)
                group = ulysses.UlyssesGroup(mesh.sp_group, self.sp_size, self.sp_rank)
                model = ulysses.SequenceParallelLoss(model, group)
            # sp ranks hold parts of the same rows: their gradients add up; replicas (dp) average
            return apply_fsdp(model, mesh.data, zero=self.zero, offload=self.offload, param_dtype=self.param_dtype,
                              gradient_divide_factor=self.dp_size if self.sp_size > 1 else None,
                              from_rank0=self.device if self.rank0_load else None)
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        # No buffer sync in forward: the model's buffers (rotary tables) are constants, and a
        # forward without collectives keeps per-rank forward times comparable.
        no_buffer_sync = ({"forward_sync_buffers": False}  # torch >= 2.13 name
                          if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                          else {"broadcast_buffers": False})
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                       gradient_as_bucket_view=True, **no_buffer_sync)

    def prepare(self, trainer, optimizer):
        return trainer, optimizer  # the loop's step seams, as in LocalContext

    def backward(self, model, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self, optimizer, scaler) -> None:
        scaler.step(optimizer)
        scaler.update()

    @contextlib.contextmanager
    def no_sync(self, model, last: bool):
        """Skip the gradient reduction of this micro-batch unless it is the step's last one."""
        if last:
            yield
        elif self.sharded:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        else:
            with model.no_sync():
                yield

    def clip_grad_norm(self, model, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (when > 0) by the global 2-norm of all gradients; returns that norm.

        FSDP2 gradients are DTensors, each rank holding a disjoint Shard(0) slice: the global
        squared norm is the sum over ranks of the local shards' squared norms, all-reduced on
        this rank's device. (`torch.nn.utils.clip_grad_norm_` gets the same on DTensors, but
        with CPU-offloaded gradients it all-reduces a CPU tensor, which an NCCL process group
        cannot: pytorch/pytorch#148532.)
        """
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return torch.zeros((), device=self.device)
        if self.sharded and self.multi_dim:
            return self._clip_mesh_grad_norm(params, max_norm)
        if self.sharded:
            from torch.distributed.tensor import DTensor

            local = []
            for p in params:
                grad = p.grad
                if isinstance(grad, DTensor):
                    if not all(placement.is_shard() for placement in grad.placements):
                        raise RuntimeError(f"expected sharded gradients, got {grad.placements}")
                    grad = grad.to_local()
                local.append(grad)
            squared = torch.nn.utils.get_total_norm(local, norm_type=2.0, foreach=True).to(self.device, torch.float32) ** 2
            dist.all_reduce(squared)
            total = squared.sqrt()
        else:
            total = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0, foreach=True)
        if max_norm and max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach=True)
        return total

    def _clip_mesh_grad_norm(self, params, max_norm: float) -> torch.Tensor:
        """`clip_grad_norm` for DTensor gradients on the dp x sp x tp mesh (FSDP, maybe TP).

        A gradient's local tensor is one of `copies` equal ones in the job: the ranks outside
        its DTensor's mesh (a tensor-parallel rank's replicated embedding, norm or head, which
        FSDP shards over dp x sp only) and its Replicate mesh dims hold copies; Shard dims hold
        disjoint parts. Summing local squared norms / copies over all ranks counts every
        element once: the true global norm. Scaling the local tensors clips every copy alike.
        """
        from torch.distributed.tensor import DTensor

        by_copies: dict[int, list[torch.Tensor]] = {}
        for p in params:
            grad, copies = p.grad, self.world_size
            if isinstance(grad, DTensor):
                mesh = grad.device_mesh
                copies //= mesh.size()
                for dim, placement in enumerate(grad.placements):
                    if placement.is_partial():
                        raise RuntimeError(f"unreduced (Partial) gradient of shape {tuple(grad.shape)}")
                    if placement.is_replicate():
                        copies *= mesh.size(dim)
                grad = grad.to_local()
            by_copies.setdefault(copies, []).append(grad)
        squared = torch.zeros((), device=self.device, dtype=torch.float32)
        for copies, grads in sorted(by_copies.items()):
            norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True).to(self.device, torch.float32)
            squared += norm ** 2 / copies
        dist.all_reduce(squared)
        total = squared.sqrt()
        if max_norm and max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch.nn.utils.clip_grads_with_norm_
            for grads in by_copies.values():
                for grad in grads:
                    grad.mul_(coef.to(grad.device))
        return total
