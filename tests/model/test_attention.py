"""Varlen attention: packed rows match the samples run one by one, in fp32."""

import helpers
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from helpers import one_by_one, packed_batch, rel_err

from tuneforge.errors import UserError
from tuneforge.model.attention import _sdpa_varlen  # noqa: PLC2701 (the grouped kernel, tested directly)
from tuneforge.model.attention import (
    VARLEN,
    model_inputs,
    register_varlen_attention,
    span_groups,
    resolve_attn_implementation,
    varlen_attention_forward,
)

LENGTHS = (5, 9, 3, 7)
PAD = 0


def tiny_model(attn: str = "sdpa") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, attn_implementation=attn,
    )
    return LlamaForCausalLM(config).float()


def make_samples():
    return helpers.make_samples(LENGTHS)


def pack(samples, rows, row_len):
    return packed_batch(samples, rows, row_len, pad_id=PAD)


def reference(model, samples):
    return one_by_one(model, samples)


def packed(model, batch):
    model.zero_grad()
    logits = model(**model_inputs(batch)).logits
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum")
    loss = loss / batch["num_loss_tokens"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


ROWS = {"one_row": ([[0, 1, 2, 3]], 26), "two_rows": ([[0, 1], [2, 3]], 16)}


@pytest.mark.parametrize("layout", ROWS)
def test_packed_varlen_matches_one_by_one(layout):
    rows, row_len = ROWS[layout]
    model = tiny_model()
    samples = make_samples()
    ref_loss, ref_grads = reference(model, samples)
    model.set_attn_implementation(register_varlen_attention())
    loss, grads = packed(model, pack(samples, rows, row_len))
    assert abs(float(loss - ref_loss)) <= 1e-5
    for name, g in grads.items():
        assert rel_err(g, ref_grads[name]) <= 1e-4, name


@pytest.mark.parametrize("layout", ROWS)
def test_builtin_sdpa_detects_packing_from_position_ids(layout):
    # transformers builds a dense block-diagonal mask when position_ids restart inside a row.
    rows, row_len = ROWS[layout]
    batch = pack(make_samples(), rows, row_len)
    model = tiny_model("sdpa")
    with torch.no_grad():
        builtin = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        builtin_with_our_kwargs = model(**model_inputs(batch)).logits  # sdpa ignores cu_seq_lens_*
        model.set_attn_implementation(register_varlen_attention())
        ours = model(**model_inputs(batch)).logits
        ours_from_positions = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(ours, builtin, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours_from_positions, builtin, atol=1e-5, rtol=0)
    torch.testing.assert_close(builtin_with_our_kwargs, builtin, atol=1e-5, rtol=0)


def test_dense_runs_differ_on_packed_row():
    rows, row_len = ROWS["one_row"]
    batch = pack(make_samples(), rows, row_len)
    ids, pos = batch["input_ids"], batch["position_ids"]
    model = tiny_model("sdpa")
    with torch.no_grad():
        # With a KV cache (use_cache defaults to True) transformers skips packed detection.
        cached = model(input_ids=ids, position_ids=pos).logits
        no_positions = model(input_ids=ids, use_cache=False).logits
        model.set_attn_implementation(register_varlen_attention())
        ours = model(**model_inputs(batch)).logits
    first = LENGTHS[0]  # the first document sees nothing foreign, the others do
    for dense in (cached, no_positions):
        torch.testing.assert_close(dense[:, :first], ours[:, :first], atol=1e-5, rtol=0)
        assert (dense[:, first:] - ours[:, first:]).abs().max() > 1e-2


class _Attn(torch.nn.Module):
    is_causal = True
    num_key_value_groups = 2


@pytest.mark.parametrize("scaling", [None, 0.3])
def test_function_matches_per_span_sdpa_with_gqa(scaling):
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 4, 2, 6, 8
    q, k, v = torch.randn(b, h, t, d), torch.randn(b, hk, t, d), torch.randn(b, hk, t, d)
    cu = torch.tensor([0, 4, 6, 7, 12], dtype=torch.int32)  # spans over the 12 flattened tokens
    out, weights = varlen_attention_forward(_Attn(), q, k, v, None, scaling=scaling, cu_seq_lens_q=cu)
    assert weights is None and out.shape == (b, t, h, d)
    flat = [x.transpose(0, 1).reshape(x.shape[1], b * t, d) for x in (q, k, v)]
    for a, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[:, a:e] for x in flat)
        ks, vs = ks.repeat_interleave(h // hk, 0), vs.repeat_interleave(h // hk, 0)
        want = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling).transpose(0, 1)
        torch.testing.assert_close(out.reshape(b * t, h, d)[a:e], want, atol=1e-6, rtol=0)
    # No spans at all: one causal sequence per row, exactly what transformers' sdpa does.
    plain, _ = varlen_attention_forward(_Attn(), q, k, v, None, scaling=scaling)
    torch.testing.assert_close(plain, sdpa_attention_forward(_Attn(), q, k, v, None, scaling=scaling)[0])


def test_resolve_and_register():
    assert resolve_attn_implementation("auto", "cpu") == VARLEN
    assert resolve_attn_implementation("varlen", "cpu") == VARLEN
    assert register_varlen_attention() == VARLEN  # idempotent
    assert resolve_attn_implementation("sdpa", "cpu") == "sdpa"
    assert resolve_attn_implementation("eager", "cuda") == "eager"
    with pytest.raises(UserError, match="flash_attn"):
        resolve_attn_implementation("flash_attention_2", "cpu")
    with pytest.raises(UserError, match="did you mean 'varlen'"):
        resolve_attn_implementation("varlenn", "cpu")


def test_padding_mask_is_refused():
    model = tiny_model(register_varlen_attention())
    ids = torch.randint(1, 128, (1, 6))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # all-ones is fine
    with pytest.raises(ValueError, match="padding"):
        model(input_ids=ids, attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0]]))


def test_span_groups_cover_every_span_within_the_padding_budget():
    lengths = [7, 0, 30, 8, 29, 1, 9, 31, 2, 30]
    groups = span_groups(lengths, slack=1.25)
    assert sorted(i for g in groups for i in g) == [i for i, n in enumerate(lengths) if n > 0]
    for group in groups:
        longest = lengths[group[0]]
        assert all(lengths[i] <= longest for i in group)
        assert len(group) * longest**2 <= 1.25 * sum(lengths[i] ** 2 for i in group)
    assert [lengths[g[0]] for g in groups] == sorted((lengths[g[0]] for g in groups), reverse=True)
    assert {frozenset(g) for g in groups} >= {frozenset({7, 2, 9, 4})}  # 31, 30, 30, 29 share one call
    assert span_groups(lengths, slack=1.0) == [[7], [2, 9], [4], [6], [3], [0], [8], [5]]  # equal lengths only


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (False, None)])
def test_grouped_spans_equal_each_span_alone_forward_and_backward(causal, window):
    """Spans of mixed lengths (so padded groups and lone spans, over two rows) against one
    SDPA call per span on exactly that span: outputs and the gradients of q, k and v."""
    torch.manual_seed(0)
    b, h, hk, t, d = 2, 4, 2, 24, 8
    cu = [0, 9, 17, 18, 26, 33, 40, 48]  # lengths 9, 8, 1, 8, 7, 7, 8 (a span crosses the row break)
    assert len(span_groups(torch.tensor(cu).diff().tolist())) < len(cu) - 1  # some spans do share a call
    q, k, v = (torch.randn(b, n, t, d, requires_grad=True) for n in (h, hk, hk))
    grad_out = torch.randn(b, t, h, d)
    kwargs = {"scaling": 0.3, "dropout": 0.0, "causal": causal, "window": window}
    out = _sdpa_varlen(q, k, v, cu, **kwargs)
    (out * grad_out).sum().backward()
    got = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    flat = [x.transpose(1, 2).reshape(b * t, x.shape[1], d) for x in (q, k, v)]
    want = []
    for a, e in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:e].transpose(0, 1) for x in flat)
        ks, vs = ks.repeat_interleave(h // hk, 0), vs.repeat_interleave(h // hk, 0)
        mask = None
        if causal and window is not None:
            dist = torch.arange(e - a)[:, None] - torch.arange(e - a)[None, :]
            mask = (dist >= 0) & (dist < window)
        want.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=0.3,
                                                   is_causal=causal and mask is None).transpose(0, 1))
    want = torch.cat(want).reshape(b, t, h, d)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    (want * grad_out).sum().backward()
    for mine, ref in zip(got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(mine, ref, atol=1e-6, rtol=0)
