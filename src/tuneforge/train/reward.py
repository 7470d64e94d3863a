"""The reward objective: a Bradley-Terry reward model trained on packed preference pairs.

Owns
- `sequence_rewards`: from a packed batch (rows of whole pairs, chosen then rejected, see
  `tuneforge.data.preference`), the scalar reward of every sequence: the decoder runs once
  over the packed rows with varlen attention and the `score` head reads the hidden state of
  each sequence's last token that is not the pad token, which is where transformers'
  `XForSequenceClassification` pools, so `final/` scores a conversation exactly as training did;
- `reward_losses`: per pair -log sigmoid(r_chosen - r_rejected), plus, when asked,
  `center_rewards` x (r_chosen + r_rejected)^2 (TRL's center_rewards_coefficient);
- `RewardLoss`: the training module (the seam of `tuneforge.train.objective`: batch in, the
  SUM of its pair losses out), which also sums TRL-style metrics for `take_metrics`:
  rewards/chosen, rewards/rejected (mean scores), rewards/accuracies, rewards/margins.
The model is the causal LM turned into a sequence classifier by `tuneforge.model.reward_head`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.model.attention import model_inputs
from tuneforge.train.loss import IGNORE_INDEX, decoder_and_head
from tuneforge.train.preference import PreferenceLoss

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def sequence_ends(batch: Mapping, pad_id: int | None) -> torch.Tensor:
    """Flat (row-major) index of each sequence's last non-pad token, for the pieces of the rows
    that hold loss tokens (every pair member; row padding does not), in batch order."""
    ids = batch["input_ids"].reshape(-1)
    cu = batch["cu_seqlens"].to(device=ids.device, dtype=torch.long)
    position = torch.arange(len(ids), device=ids.device)
    piece = torch.bucketize(position, cu[1:], right=True)
    has_loss = torch.zeros(len(cu) - 1, dtype=torch.bool, device=ids.device)
    has_loss[piece[(batch["labels"] != IGNORE_INDEX).reshape(-1)]] = True
    scored = position if pad_id is None else torch.where(ids != pad_id, position, -1)
    last = torch.full((len(cu) - 1,), -1, dtype=torch.long, device=ids.device).scatter_reduce(0, piece, scored, "amax")
    last = torch.where(last < 0, cu[1:] - 1, last)  # a sequence of pad tokens only: its last token
    ends = last[has_loss]
    if len(ends) != len(batch["sample_ids"]) or len(ends) % 2:
        raise ValueError(f"a preference batch must hold whole pairs with loss tokens: found {len(ends)} sequences "
                         f"with loss tokens for {len(batch['sample_ids'])} pieces")
    return ends


def sequence_rewards(model: nn.Module, batch: Mapping, pad_id: int | None) -> torch.Tensor:
    """The reward (fp32) of every sequence of the packed batch, in batch order."""
    decoder, score = decoder_and_head(model)
    out = decoder(**model_inputs(batch))
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    last = hidden.reshape(-1, hidden.shape[-1])[sequence_ends(batch, pad_id)]
    return score(last).squeeze(-1).float()


def reward_losses(chosen: torch.Tensor, rejected: torch.Tensor, center_rewards: float = 0.0) -> torch.Tensor:
    """Per-pair Bradley-Terry loss, optionally with TRL's reward-centring term."""
    losses = -F.logsigmoid(chosen - rejected)
    if center_rewards:
        losses = losses + center_rewards * (chosen + rejected) ** 2
    return losses


class RewardLoss(PreferenceLoss):
    """Batch of packed pairs in, the SUM over its pairs of the Bradley-Terry loss out.

    `.model` is the reward model (PEFT-wrapped or not); pairs normalise the loss, and the
    metric sums, `forget_last` and `take_metrics` are `PreferenceLoss`'s, over `METRICS`."""

    metric_names = METRICS

    def __init__(self, model: nn.Module, settings):
        super().__init__(model, chunk_size=1, objective="reward", settings=settings)

    def setup(self, trainer, ctx, datasets, pad_id, autocast) -> None:
        return None  # no reference model

    def forward(self, batch: Mapping) -> torch.Tensor:
        rewards = sequence_rewards(self.model, batch, self.model.config.pad_token_id)
        chosen, rejected = rewards[0::2], rewards[1::2]
        losses = reward_losses(chosen, rejected, self.settings.center_rewards)
        chosen, rejected = chosen.detach(), rejected.detach()
        self._record(chosen, rejected, (chosen > rejected).to(chosen.dtype), chosen - rejected)
        return losses.sum()
