"""Ulysses sequence parallel: the ranks of a sequence-parallel (SP) group share each packed row.

Owns
- `SequenceParallelLoss`: the training module under SP (a `CausalLMLoss` holding the same
  causal LM, so state-dict keys do not change). Every rank of an SP group receives the same
  collated rows (the samplers see only the data-parallel rank); its forward cuts this rank's
  shard (`shard_batch`), sums the cross-entropy of the shard's loss tokens, and returns the
  SP group's total (`SumOverGroup`: the value is summed over the group, the gradient is that
  of this rank's own part). So the loop sees the same loss sum and loss-token counts on every
  rank of a replica, exactly as one process computes them for those rows.
- `shard_batch`: a collated batch (`tuneforge.data.collate`) -> this rank's 1/N of every row.
  Rows are padded to a multiple of N (the padding is its own span with label -100), then
  `input_ids`, `labels` and `position_ids` are cut into N contiguous column blocks. Labels
  arrive already shifted by the collator (labels[t] is the target of token t), so the split
  loses no target at a shard boundary; position ids are the full row's, so rotary embeddings
  see the true positions. `cu_seqlens` / `max_seqlen` stay those of the FULL (padded) rows:
  attention runs on full rows after the all-to-all. `num_loss_tokens` counts this shard's
  loss tokens and `num_tokens` is this rank's even share of the rows' real tokens (both sum
  over the group to the rows' counts). The batch carries an `UlyssesGroup` under
  `sequence_parallel`, which `model_inputs` hands to the model as a keyword argument:
  transformers passes it on to the attention function (no global state, nothing patched).
- `ulysses_attention_forward`, registered in transformers' `AttentionInterface` as
  "tuneforge_ulysses" (`register_ulysses_attention`, selected through `attn_implementation`):
  q/k/v [B, H, T/N, D] go through an all-to-all to [B, H/N, T, D] (sequence shards traded
  for head shards), `tuneforge.model.attention.varlen_attention_forward` runs causal
  attention per document on those local heads with the full rows' `cu_seqlens`, and a second
  all-to-all brings the output back to [B, T/N, H, D]. Key/value heads that do not split over
  N (GQA) are repeated first to the fewest copies that do. Without a `sequence_parallel`
  argument (rows that were not sharded) it is plain varlen attention.
- `AllToAll`: the differentiable equal-split all-to-all (its backward is the same exchange).
- `use_ulysses_attention`: switches a loaded model from varlen attention to "tuneforge_ulysses".

Gradients: each rank's backward starts from its own tokens' loss; backward through the
all-to-alls carries every token's gradient to the rank holding it, so the ranks' gradients sum
to the full one. FSDP2 shards over the flattened dp x sp mesh and, with its gradient divide
factor set to dp, sums over sp and averages over data-parallel replicas only: the loop's
scaling by `ctx.dp_size` / loss tokens then gives exactly one process's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from tuneforge.errors import ConfigError
from tuneforge.train.loss import CausalLMLoss

ULYSSES = "tuneforge_ulysses"
IGNORE = -100


@dataclass(frozen=True)
class UlyssesGroup:
    """This rank's sequence-parallel group, handed to the attention function with the batch."""

    group: object  # torch ProcessGroup
    size: int
    rank: int


class AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 (chunk j goes to rank j); differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad, group=ctx.group)
        return out, None


def seq_to_heads(x: torch.Tensor, sp: UlyssesGroup) -> torch.Tensor:
    """[B, H, T/N, D] (this rank's tokens, all heads) -> [B, H/N, T, D] (all tokens, its heads)."""
    b, h, s, d = x.shape
    n = sp.size
    chunks = x.reshape(b, n, h // n, s, d).transpose(0, 1)  # [N (head group -> rank), B, H/N, S, D]
    got = AllToAll.apply(chunks, sp.group)  # [N (sequence shard from rank), B, H/N, S, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, h // n, n * s, d)


def heads_to_seq(x: torch.Tensor, sp: UlyssesGroup) -> torch.Tensor:
    """[B, T, H/N, D] (all tokens, this rank's heads) -> [B, T/N, H, D] (its tokens, all heads)."""
    b, t, h, d = x.shape
    n = sp.size
    chunks = x.reshape(b, n, t // n, h, d).transpose(0, 1)  # [N (sequence shard -> rank), B, S, H/N, D]
    got = AllToAll.apply(chunks, sp.group)  # [N (head group from rank), B, S, H/N, D]
    return got.permute(1, 2, 0, 3, 4).reshape(b, t // n, n * h, d)


def kv_repeats(heads: int, kv_heads: int, n: int) -> int:
    """The fewest copies r of each key/value head so that kv_heads * r splits over n ranks and
    still divides the query heads (GQA groups stay aligned)."""
    if heads % n:
        raise ConfigError(f"parallel.sequence_parallel {n} is larger than the head count allows: "
                          f"{heads} attention heads per rank, not a multiple of {n}",
                          hint="choose a sequence_parallel that divides the number of heads")
    for r in range(1, heads // kv_heads + 1):
        if (kv_heads * r) % n == 0 and heads % (kv_heads * r) == 0:
            return r
    return heads // kv_heads  # pragma: no cover - r = heads/kv_heads always qualifies


def ulysses_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: all-to-all, per-document attention on local heads, all-to-all."""
    from tuneforge.model.attention import varlen_attention_forward

    sp = kwargs.pop("sequence_parallel", None)
    if sp is None or sp.size == 1:
        return varlen_attention_forward(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if kwargs.get("cu_seq_lens_q") is None:
        raise ValueError(f"{ULYSSES} needs the full rows' cu_seq_lens_q with a sequence-parallel shard")
    r = kv_repeats(query.shape[1], key.shape[1], sp.size)
    if r > 1:
        key, value = key.repeat_interleave(r, dim=1), value.repeat_interleave(r, dim=1)
    q, k, v = (seq_to_heads(x, sp) for x in (query, key, value))
    kwargs.pop("position_ids", None)  # the local shard's; spans come from the full rows' cu_seq_lens_q
    out, _ = varlen_attention_forward(module, q, k, v, attention_mask, scaling, dropout, **kwargs)
    return heads_to_seq(out, sp), None


def register_ulysses_attention() -> str:
    """Register "tuneforge_ulysses" (attention, and varlen's mask function) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from tuneforge.model.attention import varlen_attention_mask

    AttentionInterface.register(ULYSSES, ulysses_attention_forward)
    AttentionMaskInterface.register(ULYSSES, varlen_attention_mask)
    return ULYSSES


def _spans(position_ids: torch.Tensor) -> torch.Tensor:
    from tuneforge.model.attention import cu_seqlens_from_position_ids

    return cu_seqlens_from_position_ids(position_ids, position_ids.shape[0])


def shard_batch(batch: dict, sp: UlyssesGroup) -> dict:
    """This rank's column block of every row of `batch` (see the module docstring)."""
    n, rank = sp.size, sp.rank
    input_ids, labels, positions = batch["input_ids"], batch["labels"], batch["position_ids"]
    rows, width = input_ids.shape
    cu, max_len = batch["cu_seqlens"], batch["max_seqlen"]
    pad = -width % n
    if pad:
        input_ids = torch.cat([input_ids, input_ids.new_zeros(rows, pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((rows, pad), IGNORE)], dim=1)
        # the padding is a span of its own: its positions restart at 0
        positions = torch.cat([positions, torch.arange(pad, device=positions.device).expand(rows, pad)], dim=1)
        cu = _spans(positions)
        max_len = int(cu.diff().max())
    block = (width + pad) // n
    cols = slice(rank * block, (rank + 1) * block)
    shard_labels = labels[:, cols].contiguous()
    tokens = int(batch["num_tokens"])
    return {
        **batch,
        "input_ids": input_ids[:, cols].contiguous(),
        "labels": shard_labels,
        "position_ids": positions[:, cols].contiguous(),
        "cu_seqlens": cu,
        "max_seqlen": max_len,
        "num_loss_tokens": int((shard_labels != IGNORE).sum()),
        "num_tokens": tokens // n + (rank < tokens % n),
        "sequence_parallel": sp,
    }


class SumOverGroup(torch.autograd.Function):
    """Forward: the sum of `local` over `group`; backward: the gradient goes to `local` unchanged
    (each rank differentiates only its own part; the parts' gradients add up across ranks)."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, group) -> torch.Tensor:
        total = local.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class SequenceParallelLoss(CausalLMLoss):
    """`CausalLMLoss` over this rank's shard of the rows, summed over its SP group (see above)."""

    def __init__(self, inner: CausalLMLoss, sp: UlyssesGroup):
        super().__init__(inner.model, inner.chunk_size)
        self.sp = sp

    def forward(self, batch) -> torch.Tensor:
        local = super().forward(shard_batch(batch, self.sp))
        return SumOverGroup.apply(local, self.sp.group)


def use_ulysses_attention(model) -> None:
    """Switch the causal LM `model` (PEFT-wrapped or not) from varlen to Ulysses attention."""
    from tuneforge.model.attention import FLASH, VARLEN
    from tuneforge.train.loss import decoder_and_head

    decoder, _ = decoder_and_head(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = getattr(base.config, "_attn_implementation", None)
    if current == ULYSSES:
        return
    if current not in (VARLEN, FLASH):
        raise ConfigError(f"parallel.sequence_parallel needs varlen attention, but the model uses '{current}'",
                          hint="set model.attn_implementation: auto or varlen")
    register_ulysses_attention()
    base.set_attn_implementation(ULYSSES)
    if getattr(decoder.config, "_attn_implementation", None) != ULYSSES:  # pragma: no cover - defensive
        raise ConfigError(f"{type(base).__name__} cannot switch its attention to sequence parallel",
                          hint="set parallel.sequence_parallel: 1")
