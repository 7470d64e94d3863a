"""Preference objectives on packed pairs: per-sequence log-probs, DPO/IPO/hinge, ORPO, SimPO.

Owns
- `sequence_logps`: from a packed batch (rows of whole pairs, sequences in the order chosen,
  rejected, chosen, ...; see `tuneforge.data.preference`), the sum of the log-probabilities
  of each sequence's loss tokens and their count, by segment sums over the loss positions
  (the decoder runs once over the packed rows with varlen attention; the head only on loss
  positions, `chunk_size` at a time);
- the per-pair losses (`dpo_losses`, `orpo_losses`, `simpo_losses`), written as TRL writes
  them (DPOTrainer's sigmoid/hinge/ipo, ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss with
  loss_type simpo) except that every term is per pair: RPO's and ORPO's SFT term is the chosen
  answer's mean token NLL, so that the step loss is the mean over the global batch's pairs;
- `PreferenceLoss`: the training module (same seam as `CausalLMLoss`: batch in, loss SUM
  out; the loop divides by the step's pair count), which also sums the metrics of TRL's
  logs (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
  logps/rejected) for `take_metrics`.
The reference log-probs DPO needs come from the same model with the LoRA adapter disabled,
or from a table computed once before training (`tuneforge.train.reference`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from tuneforge.model.attention import model_inputs
from tuneforge.train.loss import IGNORE_INDEX, decoder_and_head

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def _chunk_logps(states, targets, head, softcap):
    logits = head(states).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)


def token_logps(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int, softcap=None) -> torch.Tensor:
    """log p(label) at every loss position (row-major order), `chunk_size` positions at a time,
    each chunk under activation checkpointing when there are several."""
    keep = labels != IGNORE_INDEX
    states, targets = hidden[keep], labels[keep]
    use_checkpoint = torch.is_grad_enabled() and len(targets) > chunk_size
    parts = []
    for start in range(0, max(len(targets), 1), chunk_size):
        args = (states[start: start + chunk_size], targets[start: start + chunk_size], head, softcap)
        parts.append(checkpoint(_chunk_logps, *args, use_reentrant=False) if use_checkpoint else _chunk_logps(*args))
    return torch.cat(parts)


def sequence_of_loss_tokens(batch: Mapping, device) -> tuple[torch.Tensor, int]:
    """(sequence number of each loss position, number of sequences): sequences are the pieces of
    the rows that hold loss tokens (every pair member does; row padding does not), numbered in
    batch order."""
    keep = (batch["labels"] != IGNORE_INDEX).reshape(-1)
    flat = keep.nonzero().squeeze(1)
    cu = batch["cu_seqlens"].to(device=flat.device, dtype=torch.long)
    piece = torch.bucketize(flat, cu[1:], right=True)
    has_loss = torch.zeros(len(cu) - 1, dtype=torch.long, device=flat.device)
    has_loss[piece] = 1
    number = torch.cumsum(has_loss, 0) - 1
    count = int(has_loss.sum())
    expected = len(batch["sample_ids"])
    if count != expected or count % 2:
        raise ValueError(f"a preference batch must hold whole pairs with loss tokens: found {count} sequences "
                         f"with loss tokens for {expected} pieces")
    return number[piece].to(device), count


def sequence_logps(model: nn.Module, batch: Mapping, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of loss-token log-probs per sequence [S] fp32, loss tokens per sequence [S])."""
    decoder, head = decoder_and_head(model)
    out = decoder(**model_inputs(batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    per_token = token_logps(hidden, head, batch["labels"], chunk_size, getattr(decoder.config, "final_logit_softcapping", None))
    seq, count = sequence_of_loss_tokens(batch, hidden.device)
    sums = torch.zeros(count, dtype=per_token.dtype, device=per_token.device).index_add(0, seq, per_token)
    return sums, torch.bincount(seq, minlength=count)


def _sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - e) log s(x) - e log s(-x): DPO, and its conservative form (cDPO) with e > 0."""
    loss = -F.logsigmoid(logits) * (1 - label_smoothing)
    return loss - F.logsigmoid(-logits) * label_smoothing if label_smoothing else loss


def dpo_losses(pc, pr, rc, rr, nc, nr, *, beta, loss_type, label_smoothing=0.0, rpo_alpha=0.0):
    """Per-pair DPO loss and rewards from policy (pc, pr) and reference (rc, rr) log-prob sums and
    the answers' token counts (nc, nr). IPO compares per-token mean log-ratios (as TRL does)."""
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = _sigmoid_loss(beta * delta, label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        ipo_delta = chosen_ratio / nc.clamp(min=1) - rejected_ratio / nr.clamp(min=1)
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    if rpo_alpha:
        losses = losses + rpo_alpha * (-pc / nc.clamp(min=1))
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -log 2."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_losses(chosen_avg, rejected_avg, *, beta):
    """ORPO per pair: the chosen answer's mean token NLL minus beta * log sigmoid(log odds ratio)."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    losses = -chosen_avg - beta * F.logsigmoid(log_odds)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


def simpo_losses(chosen_avg, rejected_avg, *, beta, gamma, label_smoothing=0.0):
    """SimPO per pair on length-normalised log-probs with target margin gamma (CPO's loss_type simpo)."""
    losses = _sigmoid_loss(beta * (chosen_avg - rejected_avg) - gamma, label_smoothing)
    return losses, beta * chosen_avg.detach(), beta * rejected_avg.detach()


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """The PEFT model without its adapters (the DPO reference), touching nothing else.

    PEFT's `disable_adapter()` also flips the adapters' `requires_grad` off and back on, on
    whichever parameters are registered at that moment; under FSDP2 (zero 2) those are the
    unsharded copies on exit, so the sharded trainable parameters stayed frozen. Only the
    layers' disabled flag (what their forward reads) is set here.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not layers:
        raise ValueError("the DPO reference without a cached table needs a LoRA model (train.preference.reference)")
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, flag in zip(layers, before):
            layer._disable_adapters = flag


class PreferenceLoss(nn.Module):
    """Batch of packed pairs in, the SUM over its pairs of the objective's loss out.

    `.model` is the causal LM (PEFT-wrapped or not), as in `CausalLMLoss`, so checkpoints and
    wrappers see the same module tree. DPO's reference log-probs come from the same model with
    the LoRA adapter disabled, or, when `cached_reference` (the run's config) is given, from the
    table `setup` computes or loads (`tuneforge.train.reference`).
    With `reference_pass` set, forward returns the policy's per-sequence log-prob sums instead.
    """

    metric_names = METRICS

    def __init__(self, model: nn.Module, chunk_size: int, objective: str, settings, cached_reference=None):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.objective = objective
        self.settings = settings
        self.cached_reference = cached_reference  # the run's config when DPO's reference is a cached table
        self.reference = None  # the table, set by `setup` when cached
        self.reference_pass = False
        self._total = None  # metric sums since the last take_metrics: pairs, then METRICS
        self._last = None

    def loss_items(self, batch: Mapping) -> int:
        """The loss normaliser's share of this batch: its pairs."""
        return len(batch["sample_ids"]) // 2

    def setup(self, trainer, ctx, datasets, pad_id, autocast) -> None:
        """Before training: the cached reference pass (full-fine-tuning DPO), through `trainer`."""
        if self.cached_reference:
            from tuneforge.train.reference import reference_table

            self.reference = reference_table(self.cached_reference, self, trainer, ctx, datasets, pad_id, autocast)

    def _reference_logps(self, batch: Mapping) -> torch.Tensor:
        if self.cached_reference:
            return self.reference.lookup(batch["sample_ids"]).to(batch["labels"].device)
        with torch.no_grad(), adapters_off(self.model):
            return sequence_logps(self.model, batch, self.chunk_size)[0]

    def forward(self, batch: Mapping) -> torch.Tensor:
        if self.reference_pass:
            with torch.no_grad():
                return sequence_logps(self.model, batch, self.chunk_size)[0]
        s = self.settings
        reference = self._reference_logps(batch) if self.objective == "dpo" else None
        logps, counts = sequence_logps(self.model, batch, self.chunk_size)
        pc, pr, nc, nr = logps[0::2], logps[1::2], counts[0::2], counts[1::2]
        if self.objective == "dpo":
            losses, chosen, rejected = dpo_losses(pc, pr, reference[0::2], reference[1::2], nc, nr, beta=s.beta,
                                                  loss_type=s.loss_type, label_smoothing=s.label_smoothing,
                                                  rpo_alpha=s.rpo_alpha)
        else:
            pc, pr = pc / nc, pr / nr  # ORPO and SimPO work on per-token means (and log them so, as TRL)
            if self.objective == "orpo":
                losses, chosen, rejected = orpo_losses(pc, pr, beta=s.beta)
            else:
                losses, chosen, rejected = simpo_losses(pc, pr, beta=s.beta, gamma=s.gamma,
                                                        label_smoothing=s.label_smoothing)
        self._record(chosen, rejected, (chosen > rejected).to(chosen.dtype), chosen - rejected, pc.detach(), pr.detach())
        return losses.sum()

    def _record(self, *values) -> None:
        """Add this batch's per-pair `values` (one tensor per name of `metric_names`) to the sums."""
        rows = torch.stack([torch.ones_like(values[0]), *values]).sum(dim=1).double()
        self._last = rows
        self._total = rows if self._total is None else self._total + rows

    def forget_last(self) -> None:
        """Take the last batch back out of the metric sums (a padding batch in evaluation)."""
        if self._last is not None:
            self._total = self._total - self._last
            self._last = None

    def take_metrics(self, ctx, prefix: str = "") -> dict:
        """Means over all pairs seen since the last call, over every rank (a collective)."""
        total = self._total if self._total is not None else torch.zeros(len(self.metric_names) + 1, dtype=torch.float64)
        total = ctx.all_reduce_sum(total.to(ctx.device))
        self._total = self._last = None
        pairs = float(total[0])
        return {f"{prefix}{name}": float(value) / pairs if pairs else None
                for name, value in zip(self.metric_names, total[1:])}
