"""The device mesh of a job: data parallel x sequence parallel x tensor parallel.

Owns
- `MeshShape` / `mesh_shape`: the sizes (dp, sp, tp) from `parallel.sequence_parallel`,
  `parallel.tensor_parallel` and the world size, checked without any process group (a world
  size not divisible by sp x tp is a one-line `ConfigError`);
- `check_heads`: whether a model's attention heads split over tp (whole heads per rank) and
  then over sp (Ulysses trades sequence shards for head shards): a one-line `ConfigError` when
  they do not; `check_model_for_mesh` runs it on a model folder before any rank starts, and
  refuses LoRA under tensor parallel;
- `ParallelMesh` / `build_mesh`: the torch `DeviceMesh` ("dp", "sp", "tp") with the groups the
  rest of tuneforge needs: `data` (the mesh FSDP shards over: the flattened dp x sp dims, as
  torchtitan's `dp_shard_cp`, because parameters are replicated over sp and each sp rank holds
  other tokens of the same rows), `dp_group` (sums over data-parallel replicas),
  `replica_group` (the sp x tp ranks of one replica), `sp_group` (Ulysses' all-to-all) and
  `tp` (the tensor-parallel sub-mesh).

Rank layout is row-major over (dp, sp, tp): rank = (dp_rank * sp + sp_rank) * tp + tp_rank, so
the ranks of one tensor-parallel group are neighbours (on one node when tp divides the GPUs
per node), then the sequence-parallel group, then data-parallel replicas. Every rank of one
sp x tp block reads the same rows (the samplers see `dp_rank` / `dp_size`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.errors import ConfigError

DIM_NAMES = ("dp", "sp", "tp")


@dataclass(frozen=True)
class MeshShape:
    dp: int
    sp: int
    tp: int

    @property
    def world_size(self) -> int:
        return self.dp * self.sp * self.tp

    def coordinates(self, rank: int) -> tuple[int, int, int]:
        """(dp_rank, sp_rank, tp_rank) of global `rank` in the row-major (dp, sp, tp) layout."""
        return rank // (self.sp * self.tp), (rank // self.tp) % self.sp, rank % self.tp

    def __str__(self) -> str:
        return f"dp {self.dp} x sp {self.sp} x tp {self.tp}"


def mesh_shape(world_size: int, sequence_parallel: int = 1, tensor_parallel: int = 1) -> MeshShape:
    """(dp, sp, tp) for `world_size` ranks; a ConfigError when sp x tp does not divide it."""
    for key, value in (("sequence_parallel", sequence_parallel), ("tensor_parallel", tensor_parallel)):
        if value < 1:
            raise ConfigError(f"parallel.{key} must be at least 1, got {value}")
    inner = sequence_parallel * tensor_parallel
    if world_size % inner:
        raise ConfigError(f"parallel.sequence_parallel ({sequence_parallel}) x parallel.tensor_parallel "
                          f"({tensor_parallel}) = {inner} does not divide the world size {world_size}",
                          hint=f"start a multiple of {inner} processes, or lower those keys")
    return MeshShape(world_size // inner, sequence_parallel, tensor_parallel)


def check_heads(num_heads: int, num_kv_heads: int | None, sequence_parallel: int = 1, tensor_parallel: int = 1) -> None:
    """A ConfigError unless the heads split: whole query and key/value heads per tensor-parallel
    rank, and the local query heads over the sequence-parallel ranks (key/value heads that do
    not split over sp are replicated by the Ulysses attention, which GQA allows)."""
    kv = num_kv_heads or num_heads
    if tensor_parallel > 1 and (num_heads % tensor_parallel or kv % tensor_parallel):
        raise ConfigError(f"parallel.tensor_parallel {tensor_parallel} does not divide the model's {num_heads} "
                          f"attention heads and {kv} key/value heads",
                          hint="choose a tensor_parallel that divides both")
    local = num_heads // tensor_parallel
    if sequence_parallel > 1 and local % sequence_parallel:
        per_rank = f"{local} heads per tensor-parallel rank" if tensor_parallel > 1 else f"{num_heads} attention heads"
        raise ConfigError(f"parallel.sequence_parallel {sequence_parallel} is larger than the head count allows: "
                          f"the model has {per_rank}, not a multiple of {sequence_parallel}",
                          hint="choose a sequence_parallel that divides the number of heads")


def model_heads(config) -> tuple[int, int]:
    """(attention heads, key/value heads) of a transformers config (a text sub-config too)."""
    config = getattr(config, "text_config", None) or config
    heads = getattr(config, "num_attention_heads", None)
    if heads is None:
        raise ConfigError(f"cannot read the attention head count of {type(config).__name__} for tensor or sequence "
                          "parallel", hint="set parallel.tensor_parallel and parallel.sequence_parallel to 1")
    return heads, getattr(config, "num_key_value_heads", None) or heads


def check_model_for_mesh(model_cfg, parallel) -> None:
    """Before any rank starts: `check_heads` for the model folder of `model_cfg` (its
    config.json), and no LoRA under tensor parallel (its adapters wrap the projections TP splits)."""
    if parallel.sequence_parallel == 1 and parallel.tensor_parallel == 1:
        return
    from types import SimpleNamespace

    from tuneforge.model.load import check_model_folder  # imports torch: only when needed

    if parallel.tensor_parallel > 1 and (model_cfg.lora is not None or model_cfg.adapter is not None):
        raise ConfigError("parallel.tensor_parallel > 1 does not work with LoRA (model.lora) here",
                          hint="use parallel.tensor_parallel: 1 (FSDP, sequence_parallel) for LoRA")
    config = check_model_folder(model_cfg)
    text = config.get("text_config") or config
    check_heads(*model_heads(SimpleNamespace(**text)), parallel.sequence_parallel, parallel.tensor_parallel)


@dataclass
class ParallelMesh:
    """The job's DeviceMesh and the groups cut from it (see the module docstring)."""

    shape: MeshShape
    device_mesh: object  # torch DeviceMesh ("dp", "sp", "tp")
    data: object  # 1-D DeviceMesh over dp x sp: FSDP's shard mesh
    replica: object  # 1-D DeviceMesh over sp x tp: the ranks of one data-parallel replica
    tp: object  # 1-D DeviceMesh over tp

    @property
    def dp_group(self):
        return self.device_mesh.get_group("dp")

    @property
    def replica_group(self):
        return self.replica.get_group()

    @property
    def sp_group(self):
        return self.device_mesh.get_group("sp")

    @property
    def tp_group(self):
        return self.tp.get_group()


def build_mesh(device_type: str, shape: MeshShape) -> ParallelMesh:
    """Collective: the ("dp", "sp", "tp") DeviceMesh of this job with its flattened dp x sp mesh."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (shape.dp, shape.sp, shape.tp), mesh_dim_names=DIM_NAMES)
    # DeviceMesh has no public flatten yet; `_flatten` is what torchtitan uses for dp_shard_cp.
    data = mesh["dp", "sp"]._flatten("dp_sp")
    replica = mesh["sp", "tp"]._flatten("sp_tp")
    return ParallelMesh(shape, mesh, data, replica, mesh["tp"])
