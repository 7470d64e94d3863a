"""What the training loop optimises: `train.objective` as one small module the loop calls.

`build_objective` returns the training module for the config: `SFTObjective` (the token-exact
causal-LM loss of `CausalLMLoss`), `tuneforge.train.preference.PreferenceLoss` (dpo, orpo,
simpo) or `tuneforge.train.reward.RewardLoss` (reward: a Bradley-Terry reward model, whose
model the loop first turns into a sequence classifier, `tuneforge.model.reward_head`). Both are called the same way, so the loop is one function for every objective:
- `module(batch)` -> the SUM of the batch's losses (loss tokens for SFT, pairs otherwise);
- `loss_items(batch)` -> the batch's share of the normaliser (its loss tokens, or its pairs);
  the loop divides by the step's total over micro-batches and ranks;
- `setup(trainer, ctx, datasets, pad_id, autocast)` -> once before training (and before a
  resumed checkpoint is loaded): DPO's cached reference pass for full fine-tuning;
- `take_metrics(ctx, prefix)` -> the objective's own metric means since the last call (a
  collective on every rank); `forget_last()` drops the last batch from them.
"""

from __future__ import annotations

from collections.abc import Mapping

from tuneforge.errors import UserError
from tuneforge.train.loss import CausalLMLoss


class SFTObjective(CausalLMLoss):
    """Supervised fine-tuning: summed token cross-entropy, normalised by loss tokens."""

    def loss_items(self, batch: Mapping) -> int:
        return batch["num_loss_tokens"]

    def setup(self, trainer, ctx, datasets, pad_id, autocast) -> None:
        return None

    def take_metrics(self, ctx, prefix: str = "") -> dict:
        return {}

    def forget_last(self) -> None:
        return None


def build_objective(cfg, model):
    """The training module for `cfg.train.objective` around the causal LM `model`."""
    tc = cfg.train
    if tc.objective == "sft":
        return SFTObjective(model, tc.loss_chunk_size)
    if cfg.parallel.sequence_parallel > 1 or cfg.parallel.tensor_parallel > 1:
        raise UserError(f"train.objective {tc.objective} does not run under sequence or tensor parallel "
                        "(a pair's log-probs need whole sequences on one rank)",
                        hint="set parallel.sequence_parallel: 1 and parallel.tensor_parallel: 1")
    if tc.objective == "reward":
        from tuneforge.train.reward import RewardLoss

        return RewardLoss(model, tc.preference)
    from tuneforge.train.preference import PreferenceLoss

    return PreferenceLoss(model, tc.loss_chunk_size, tc.objective, tc.preference,
                          cached_reference=cfg if tc.objective == "dpo" and uses_cached_reference(cfg) else None)


def uses_cached_reference(cfg) -> bool:
    """DPO's reference: cached log-probs (full fine-tuning, or asked for) or the adapter-less model."""
    setting = cfg.train.preference.reference
    return setting == "cached" or (setting == "auto" and cfg.model.lora is None)
