"""Token-exact causal-LM loss without full-batch logits.

Owns
- `chunked_lm_loss`: the SUM of cross-entropy over positions whose label is not -100. Loss
  positions are gathered first (no logits for the rest), then lm_head + CE run `chunk_size`
  tokens at a time, each chunk under activation checkpointing (when there is more than one),
  so at most one chunk's fp32 logits is alive in forward and in backward;
- `decoder_and_head` / `decoder_layers`: the base decoder and output head, and the decoder's
  blocks, of a plain or PEFT-wrapped causal LM;
- `lm_loss_sum`: batch -> (loss sum, loss-token count), applying the model's final-logit
  softcapping when its config has one and adding a MoE router's load-balancing loss.
Labels arrive already shifted (labels[b, t] is the target of position t), so nothing is
shifted here; the caller divides by the global loss-token count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuneforge.errors import UserError
from tuneforge.model.attention import model_inputs
from tuneforge.model.reward_head import is_reward_model

IGNORE_INDEX = -100


def _chunk_ce(hidden: torch.Tensor, targets: torch.Tensor, lm_head: nn.Module, softcap: float | None) -> torch.Tensor:
    logits = lm_head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """Sum of CE between `states @ weight.T (+ bias)` and `targets`, for a head that is not trained.

    Forward runs `chunk_size` rows at a time and, while each chunk's logits exist, also computes
    that chunk's gradient w.r.t. `states` ((softmax - one_hot) @ weight, through the softcap
    when there is one), so backward only scales the saved [N, D] gradient. No logits outlive
    their chunk and nothing is recomputed: memory holds one chunk of fp32 logits instead of
    logits, log-softmax and their gradients for every loss token.
    """

    @staticmethod
    def forward(ctx, states, weight, bias, targets, chunk_size: int, softcap):
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        grad = torch.empty_like(states) if ctx.needs_input_grad[0] else None
        for start in range(0, len(targets), chunk_size):
            chunk = slice(start, start + chunk_size)
            logits = F.linear(states[chunk], weight, bias).float()
            capped = None
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            target = targets[chunk, None]
            log_probs = torch.log_softmax(logits, dim=-1)  # one fused kernel (logsumexp + sub is 3x slower on CPU)
            del logits
            total -= log_probs.gather(1, target).sum()
            if grad is not None:
                probs = log_probs.exp_()  # softmax, in place
                probs.scatter_add_(1, target, torch.full_like(target, -1, dtype=probs.dtype))
                if capped is not None:
                    probs.mul_(1 - capped * capped)  # d(softcap * tanh(z / softcap)) / dz
                grad[chunk] = probs.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return (grad * grad_total.to(grad.dtype) if grad is not None else None), None, None, None, None, None


def _frozen_linear_head(lm_head: nn.Module) -> bool:
    """A plain nn.Linear whose weight (and bias) are not trained and not DTensors (TP/FSDP shards)."""
    if type(lm_head) is not nn.Linear:
        return False
    params = [p for p in (lm_head.weight, lm_head.bias) if p is not None]
    return not any(p.requires_grad for p in params) and all(type(p) in (nn.Parameter, torch.Tensor) for p in params)


def chunked_lm_loss(
    hidden: torch.Tensor,
    lm_head: nn.Module,
    labels: torch.Tensor,
    chunk_size: int,
    softcap: float | None = None,
) -> torch.Tensor:
    """Sum (fp32) of CE over labels != -100 of `lm_head(hidden)`, `chunk_size` tokens at a time.

    A frozen plain linear head (LoRA) goes through `FrozenHeadCrossEntropy`; a trained one
    through per-chunk activation checkpointing."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    keep = labels != IGNORE_INDEX
    states = hidden[keep]  # [N, D]: only loss positions ever reach lm_head
    targets = labels[keep]
    if _frozen_linear_head(lm_head):
        return FrozenHeadCrossEntropy.apply(states, lm_head.weight, lm_head.bias, targets, chunk_size, softcap)
    # One chunk saves no more than its own recomputation would need: checkpoint only when there are several.
    use_checkpoint = torch.is_grad_enabled() and len(targets) > chunk_size
    total = None
    # At least one (possibly empty) chunk, so lm_head stays in the graph when N == 0.
    for start in range(0, max(len(targets), 1), chunk_size):
        args = (states[start: start + chunk_size], targets[start: start + chunk_size], lm_head, softcap)
        part = checkpoint(_chunk_ce, *args, use_reentrant=False) if use_checkpoint else _chunk_ce(*args)
        total = part if total is None else total + part
    return total


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder returning last_hidden_state, output head) of a causal LM, PEFT-wrapped or not (for
    a reward model, its scalar `score` head)."""
    if _is_peft(model):
        if model.active_peft_config.is_prompt_learning:
            raise UserError("prompt-learning PEFT adapters are not supported", hint="use LoRA")
        model = model.get_base_model()  # the transformers model, with adapter layers injected
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None and is_reward_model(model):
        head = getattr(model, "score", None)  # a reward model (tuneforge.model.reward_head): the scalar head
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        raise UserError(f"{type(model).__name__} is not a causal LM with a decoder and an output head")
    return decoder, head


def decoder_layers(model: nn.Module, purpose: str = "use", hint: str | None = None) -> nn.ModuleList:
    """The decoder blocks of a causal LM (plain or PEFT), as the ModuleList that holds them:
    `decoder.layers`, else the longest ModuleList of identical blocks (`h`, `blocks`, ...)."""
    decoder, _ = decoder_and_head(model)
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    candidates = [m for m in decoder.modules() if isinstance(m, nn.ModuleList) and len(m) > 0
                  and len({type(layer) for layer in m}) == 1]
    if not candidates:
        raise UserError(f"cannot find the decoder layers of {type(decoder).__name__} to {purpose}", hint=hint)
    return max(candidates, key=len)


def router_aux_loss(model: nn.Module, router_logits) -> torch.Tensor:
    """The MoE load-balancing loss exactly as the model's own forward computes it."""
    import sys

    base = model.get_base_model() if _is_peft(model) else model
    balance = getattr(sys.modules[type(base).__module__], "load_balancing_loss_func")
    config = base.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts")
    return balance(router_logits, experts, config.num_experts_per_tok, None)


def lm_loss_sum(model: nn.Module, batch: Mapping, chunk_size: int) -> tuple[torch.Tensor, int]:
    """(sum of token CE over the batch's loss positions, number of those positions).

    For a mixture-of-experts model whose config asks for router logits, the router's
    load-balancing loss (times `router_aux_loss_coef`) is added once per loss token, so that
    dividing by the step's loss-token count weights it like the token loss.
    """
    decoder, head = decoder_and_head(model)
    config = decoder.config
    moe = bool(getattr(config, "output_router_logits", False)) and getattr(config, "router_aux_loss_coef", 0)
    inputs = model_inputs(batch)
    if moe:
        inputs["output_router_logits"] = True
    out = decoder(**inputs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    softcap = getattr(config, "final_logit_softcapping", None)
    labels = batch["labels"]
    loss = chunked_lm_loss(hidden, head, labels, chunk_size, softcap=softcap)
    count = batch.get("num_loss_tokens")
    count = int((labels != IGNORE_INDEX).sum()) if count is None else int(count)
    if moe and getattr(out, "router_logits", None) is not None:
        loss = loss + config.router_aux_loss_coef * router_aux_loss(model, out.router_logits) * count
    return loss, count


class CausalLMLoss(nn.Module):
    """The training forward as one module: batch in, summed loss-token cross-entropy out.

    Wrappers that hook a module's forward (DDP's gradient sync, FSDP2's parameter
    gathering) wrap this module, so the decoder and the chunked LM head run inside a
    single wrapped forward. `.model` is the causal LM (PEFT-wrapped or not).
    """

    def __init__(self, model: nn.Module, chunk_size: int):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, batch: Mapping) -> torch.Tensor:
        return lm_loss_sum(self.model, batch, self.chunk_size)[0]
