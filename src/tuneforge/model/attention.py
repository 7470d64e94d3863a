"""Varlen attention: packed documents attend only to themselves.

Owns
- `varlen_attention_forward`, an attention function with transformers' signature that runs
  causal attention over each document span alone (from `cu_seq_lens_q`, else from
  `position_ids`, else one span per row): `flash_attn_varlen_func` for half-precision CUDA
  tensors when flash_attn imports, otherwise `scaled_dot_product_attention(is_causal=True)`
  over groups of spans of similar length, each group right-padded into one batch (`span_groups`);
- its registration as "tuneforge_varlen" in transformers' `AttentionInterface`, next to a
  mask function that builds no dense mask (`register_varlen_attention`);
- the mapping from the config's `attn_implementation` to the model's (`resolve_attn_implementation`);
- the translation of a packed batch into model kwargs (`model_inputs`; a sequence-parallel
  shard's `UlyssesGroup` rides along to `tuneforge.parallel.sequence_parallel`'s attention).

Spans are over the B*T tokens flattened row-major, as in the data pipeline's `cu_seqlens`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from tuneforge.errors import UserError, did_you_mean

VARLEN = "tuneforge_varlen"
FLASH = "flash_attention_2"
CHOICES = ("auto", "sdpa", "eager", "flash_attention_2", "varlen")


@functools.cache
def _flash_varlen_func():
    """`flash_attn.flash_attn_varlen_func`, or None when flash_attn does not import."""
    try:
        from flash_attn import flash_attn_varlen_func
    except (ImportError, OSError):
        return None
    return flash_attn_varlen_func


def flash_attn_available() -> bool:
    """True when flash_attn (>= 2.3.3) is installed and CUDA is usable."""
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def cu_seqlens_from_position_ids(position_ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Span boundaries (int32, over the flattened tokens): a span starts at every row start
    and wherever a position is not the previous one plus one."""
    pos = position_ids.expand(batch_size, -1)
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    idx = starts.reshape(-1).nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([pos.numel()])]).to(torch.int32)


def _span_bounds(kwargs: Mapping, batch_size: int, seq_len: int, device) -> torch.Tensor:
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None and kwargs.get("position_ids") is not None:
        cu = cu_seqlens_from_position_ids(kwargs["position_ids"], batch_size)
    if cu is None:
        cu = torch.arange(0, (batch_size + 1) * seq_len, seq_len, device=device, dtype=torch.int32)
    return cu


GROUP_SLACK = 1.25


def span_groups(lengths: list[int], slack: float = GROUP_SLACK) -> list[list[int]]:
    """Spans (by index) to attend together, one batched kernel call per group.

    Longest first; a group takes the next span while padding each of its spans to its longest
    costs at most `slack` times the causal work of the spans themselves (which grows as L^2).
    A CPU kernel call per short document leaves threads idle and pays its set-up each time:
    forward + backward over SmolLM2-135M's heads (9 query, 3 key/value heads of 64, 2 threads)
    took 1.3-2.1x less time for 25 documents of 40 tokens in one call, and ~1.1x less for
    Alpaca's packed rows (5-6 documents of 300-600 tokens). Empty spans are left out."""
    order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    work = 0
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] ** 2 <= slack * (work + lengths[i] ** 2):
            groups[-1].append(i)
            work += lengths[i] ** 2
        else:
            groups.append([i])
            work = lengths[i] ** 2
    return groups


def _group_sdpa(q, k, v, starts: torch.Tensor, lengths: torch.Tensor, *, scaling, dropout, causal, window):
    """Spans of the flattened [N, H, D] tokens, right-padded into one [n, H, L_max, D] batch.

    Causal attention makes the padding exact: a real query never reaches the padded keys after
    its own span, and padded queries' outputs (hence their gradients) are dropped. The padded
    slots repeat the span's last token, so every gathered index is a real one."""
    longest = int(lengths.max())
    pos = torch.arange(longest, device=q.device)
    index = starts[:, None] + torch.minimum(pos[None, :], lengths[:, None] - 1)  # [n, L_max]
    mask = None
    if causal and window is not None and longest > window:
        dist = pos[:, None] - pos[None, :]
        mask, causal = (dist >= 0) & (dist < window), False
    flat = index.flatten()
    qg, kg, vg = (x.index_select(0, flat).view(*index.shape, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(
        qg, kg, vg, attn_mask=mask, dropout_p=dropout, scale=scaling,
        is_causal=causal, enable_gqa=qg.shape[1] != kg.shape[1],
    )
    real = (pos[None, :] < lengths[:, None]).flatten().nonzero().flatten()
    return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[3]).index_select(0, real)  # span after span


def _sdpa_varlen(query, key, value, bounds: list[int], **span_kwargs) -> torch.Tensor:
    batch, _, seq_len, _ = query.shape
    tokens = batch * seq_len
    # [B, H, T, D] -> [B*T, H, D]: spans index the row-major flattened tokens.
    q, k, v = (x.transpose(1, 2).reshape(tokens, x.shape[1], x.shape[-1]) for x in (query, key, value))
    starts, lengths = bounds[:-1], [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    if span_kwargs["causal"]:
        groups = span_groups(lengths)
    else:  # without the causal mask padded keys would be seen: each span alone
        groups = [[i] for i, n in enumerate(lengths) if n > 0]
    outs, order = [], []
    for group in groups:
        g_starts, g_lengths = (torch.tensor([x[i] for i in group], device=q.device) for x in (starts, lengths))
        outs.append(_group_sdpa(q, k, v, g_starts, g_lengths, **span_kwargs))
        order.extend(group)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order != sorted(order):  # back to token order
        where = torch.cat([torch.arange(starts[i], starts[i] + lengths[i], device=q.device) for i in order])
        out = out.index_select(0, torch.argsort(where))  # the inverse permutation
    return out.reshape(batch, seq_len, out.shape[-2], out.shape[-1])


def _flash_varlen(fn, query, key, value, cu, max_len, *, scaling, dropout, causal, window, softcap):
    batch, _, seq_len, _ = query.shape
    q, k, v = (x.transpose(1, 2).reshape(batch * seq_len, x.shape[1], x.shape[-1]) for x in (query, key, value))
    cu = cu.to(device=query.device, dtype=torch.int32)
    if max_len is None:
        max_len = int(cu.diff().max())
    extra = {}  # only when set: older flash_attn releases lack `softcap`
    if window is not None:
        extra["window_size"] = (window - 1, window - 1)
    if softcap is not None:
        extra["softcap"] = softcap
    out = fn(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=int(max_len), max_seqlen_k=int(max_len),
        dropout_p=dropout, softmax_scale=scaling, causal=causal, **extra,
    )
    return out.reshape(batch, seq_len, out.shape[-2], out.shape[-1])


@torch.compiler.disable  # data-dependent document loop: under model.compile it runs eagerly between graphs,
def varlen_attention_forward(  # instead of being recompiled for every number of documents in a row
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over [B, H, T, D] inputs, one causal block per document span; returns
    ([B, T, H, D], None) like transformers' sdpa_attention_forward."""
    if attention_mask is not None:
        raise ValueError(f"{VARLEN} takes no attention mask: spans come from cu_seq_lens_q or position_ids")
    batch, _, seq_len, _ = query.shape
    if key.shape[2] != seq_len:
        raise ValueError(f"{VARLEN} is for training (no KV cache); set attn_implementation to 'sdpa' to generate")
    is_causal = kwargs.get("is_causal")
    span_kwargs = {
        "scaling": scaling,
        "dropout": dropout,
        "causal": getattr(module, "is_causal", True) if is_causal is None else is_causal,
        "window": kwargs.get("sliding_window"),
    }
    cu = _span_bounds(kwargs, batch, seq_len, query.device)
    half = query.dtype in (torch.float16, torch.bfloat16)
    if query.is_cuda and half and (flash := _flash_varlen_func()) is not None:
        out = _flash_varlen(flash, query, key, value, cu, kwargs.get("max_length_q"),
                            softcap=kwargs.get("softcap"), **span_kwargs)
        return out, None
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{VARLEN} cannot softcap attention logits without flash_attn; use 'eager'")
    bounds = cu.tolist()
    if bounds[0] != 0 or bounds[-1] != batch * seq_len:
        raise ValueError(f"cu_seq_lens_q must run from 0 to {batch * seq_len} (B*T), got {bounds[0]}..{bounds[-1]}")
    return _sdpa_varlen(query, key, value, bounds, **span_kwargs), None


def varlen_attention_mask(*args, attention_mask: torch.Tensor | None = None, **kwargs) -> None:
    """Mask function for "tuneforge_varlen": no dense mask; padding masks are refused, since
    the attention would otherwise silently ignore them."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{VARLEN} does not take padding masks: pack without padding or mark it as its own span")
    return None


def register_varlen_attention() -> str:
    """Register "tuneforge_varlen" (attention and mask) with transformers; safe to call again."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN, varlen_attention_mask)
    return VARLEN


def resolve_attn_implementation(requested: str, device_type: str) -> str:
    """Config value (auto | sdpa | eager | flash_attention_2 | varlen) -> the model's attn implementation."""
    if requested in ("auto", "varlen"):
        if device_type == "cuda" and flash_attn_available():
            return FLASH
        return register_varlen_attention()
    if requested == FLASH and not (device_type == "cuda" and flash_attn_available()):
        raise UserError(
            "attn_implementation 'flash_attention_2' needs a CUDA device and the flash_attn package",
            hint="install flash-attn, or use 'varlen' which packs without it",
        )
    if requested in CHOICES:
        return requested
    raise UserError(f"unknown attn_implementation '{requested}'", hint=did_you_mean(requested, CHOICES))


def model_inputs(batch: Mapping) -> dict:
    """The kwargs for `model(...)` / `model.model(...)` from a packed batch."""
    cu = batch["cu_seqlens"]
    max_len = int(batch["max_seqlen"])
    inputs = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "attention_mask": None,
        "use_cache": False,
        "cu_seq_lens_q": cu,
        "cu_seq_lens_k": cu,
        "max_length_q": max_len,
        "max_length_k": max_len,
    }
    if batch.get("sequence_parallel") is not None:  # a row shard: transformers hands this on to the attention
        inputs["sequence_parallel"] = batch["sequence_parallel"]
    return inputs
