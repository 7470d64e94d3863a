"""Chunked CE is token-exact; lm_loss_sum on packed batches equals samples run one by one."""

import helpers
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from helpers import one_by_one, packed_batch, rel_err

from tuneforge.model.attention import register_varlen_attention
from tuneforge.train.loss import chunked_lm_loss, decoder_and_head, lm_loss_sum


class Recorder(torch.nn.Linear):
    """An lm_head that records how many rows each call sees."""

    def __init__(self, *args):
        super().__init__(*args)
        self.rows = []

    def forward(self, x):
        self.rows.append(x.shape[0])
        return super().forward(x)


def ce_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 11, 16, generator=gen, requires_grad=True)
    torch.manual_seed(seed)
    head = Recorder(16, 50, False)
    labels = torch.randint(0, 50, (2, 11), generator=gen)
    labels[0, :4] = -100
    labels[1, 8:] = -100
    return hidden, head, labels  # 15 loss tokens


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 64])
def test_chunked_ce_matches_full_logits(chunk_size, softcap):
    hidden, head, labels = ce_case()
    logits = head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    count = int((labels != -100).sum())
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / count
    ref_h, ref_w = torch.autograd.grad(ref, (hidden, head.weight))

    head.rows.clear()
    loss = chunked_lm_loss(hidden, head, labels, chunk_size, softcap=softcap) / count
    assert head.rows and sum(head.rows) == count and max(head.rows) <= chunk_size  # loss rows only, chunked
    grad_h, grad_w = torch.autograd.grad(loss, (hidden, head.weight))
    recomputed = count if chunk_size < count else 0  # several chunks: each is recomputed in backward
    assert sum(head.rows) == count + recomputed
    assert loss.dtype == torch.float32
    assert abs((loss - ref).item()) <= 1e-5
    assert rel_err(grad_h, ref_h) <= 1e-4 and rel_err(grad_w, ref_w) <= 1e-4


def test_chunked_ce_softcap_changes_the_loss():
    hidden, head, labels = ce_case()
    with torch.no_grad():
        plain, capped = (chunked_lm_loss(hidden, head, labels, 4, softcap=cap) for cap in (None, 1.0))
    assert abs(float(plain - capped)) > 1e-2


def test_no_loss_tokens_gives_zero_with_a_graph():
    hidden, head, labels = ce_case()
    loss = chunked_lm_loss(hidden, head, torch.full_like(labels, -100), 4)
    loss.backward()
    assert loss.item() == 0.0 and float(head.weight.grad.abs().sum()) == 0.0


def test_checkpointing_keeps_one_chunk_of_logits():
    # Bytes saved for backward: without checkpointing every chunk's fp32 logits would be kept.
    hidden, head, labels = ce_case()
    saved = []

    def pack_hook(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        chunked_lm_loss(hidden, head, labels, 4)
    full_logits = 15 * 50 * 4
    assert sum(saved) < full_logits / 2


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [1, 4, 15, 64])
def test_frozen_head_ce_matches_full_logits(chunk_size, softcap):
    """A frozen nn.Linear head (LoRA) takes the fused path: same loss and hidden-state gradient."""
    hidden, recorder, labels = ce_case()
    head = torch.nn.Linear(16, 50, bias=True)
    with torch.no_grad():
        head.weight.copy_(recorder.weight)
        head.bias.normal_()
    head.requires_grad_(False)
    logits = head(hidden).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    count = int((labels != -100).sum())
    ref = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum") / count
    (ref_h,) = torch.autograd.grad(2.5 * ref, hidden)

    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        loss = chunked_lm_loss(hidden, head, labels, chunk_size, softcap=softcap) / count
    (grad_h,) = torch.autograd.grad(2.5 * loss, hidden)
    assert abs((loss - ref).item()) <= 1e-5 and rel_err(grad_h, ref_h) <= 1e-5
    assert (count, 16) in saved and not any(50 in shape for shape in saved)  # the [N, D] gradient, never logits


def test_frozen_head_no_loss_tokens():
    hidden, _, labels = ce_case()
    head = torch.nn.Linear(16, 50, bias=False).requires_grad_(False)
    loss = chunked_lm_loss(hidden, head, torch.full_like(labels, -100), 4)
    loss.backward()
    assert loss.item() == 0.0 and float(hidden.grad.abs().sum()) == 0.0


# ---- lm_loss_sum on packed batches --------------------------------------------------------

LENGTHS = (6, 9, 4, 7)


def make_samples():
    return helpers.make_samples(LENGTHS)


def pack(samples, rows, row_len):
    return packed_batch(samples, rows, row_len)


def check_lm_loss_sum(model, chunk_size=5):
    samples = make_samples()
    ref_loss, ref_grads = one_by_one(model, samples)
    model.set_attn_implementation(register_varlen_attention())
    model.zero_grad()
    batch = pack(samples, [[0, 1], [2, 3]], 16)
    loss_sum, count = lm_loss_sum(model, batch, chunk_size)
    assert count == sum(int((y[1:] != -100).sum()) for _, y in samples)
    (loss_sum / count).backward()
    assert abs((loss_sum.detach() / count - ref_loss).item()) <= 1e-5
    assert ref_grads
    for name, ref in ref_grads.items():
        assert rel_err(dict(model.named_parameters())[name].grad, ref) <= 1e-4, name


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, attn_implementation="sdpa",
    ))


def test_decoder_and_head_plain_and_peft():
    model = tiny_llama()
    assert decoder_and_head(model) == (model.model, model.lm_head)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    decoder, head = decoder_and_head(peft)
    assert decoder is model.model and head is model.lm_head


def test_lm_loss_sum_plain_model():
    check_lm_loss_sum(tiny_llama())


def test_lm_loss_sum_peft_lora():
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(tiny_llama(), lora)
    check_lm_loss_sum(model, chunk_size=3)


def test_lm_loss_sum_gemma2_softcap_sliding_window_scaling():
    # final_logit_softcapping, sliding-window layers (window 5 < document 9) and a non-default scaling.
    torch.manual_seed(0)
    config = Gemma2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=128, sliding_window=5, query_pre_attn_scalar=24, final_logit_softcapping=2.0,
        attn_logit_softcapping=None, attn_implementation="eager",
    )
    check_lm_loss_sum(Gemma2ForCausalLM(config).float())
