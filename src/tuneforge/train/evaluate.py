"""Evaluation during training: token-exact loss on eval data and sample generations."""

from __future__ import annotations

import torch

from tuneforge.data.records import Message


@torch.no_grad()
def evaluate(trainer, model, eval_data, tokenizer, cfg, ctx, device, objective=None) -> dict:
    """{'eval_loss': mean CE over all eval loss tokens, 'samples': [{prompt, reply}, ...]}.

    `trainer` is the (possibly wrapped) loss module, `model` the causal LM it holds, `objective`
    the unwrapped module (`tuneforge.train.objective`): a preference objective's eval_loss is
    the mean over eval pairs, and its metrics come as eval_rewards/accuracies and the like.
    """
    from tuneforge.data.collate import collate_rows
    from tuneforge.generate import generate_reply

    was_training = trainer.training
    trainer.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    rows = list(range(ctx.dp_rank, len(eval_data), ctx.dp_size))
    size = cfg.train.micro_batch_size
    # Under FSDP every forward is a collective (parameter all-gathers): all ranks run the same
    # number of batches, a rank with fewer rows repeating one with its loss discarded.
    batches = -(-len(range(0, len(eval_data), ctx.dp_size)) // size) if ctx.sharded else -(-len(rows) // size)
    for index in range(batches):
        chunk = rows[index * size: (index + 1) * size]
        batch = collate_rows([eval_data.row(r) for r in chunk or rows[:1] or [0]], tokenizer.pad_token_id)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        part = trainer(batch).double()
        if chunk:
            total += part
            count += objective.loss_items(batch) if objective is not None else batch["num_loss_tokens"]
        elif objective is not None:
            objective.forget_last()
    total, count = ctx.all_reduce_sum(total), ctx.all_reduce_sum(count)
    extra = objective.take_metrics(ctx, prefix="eval_") if objective is not None else {}
    samples = []
    # Generation runs on rank 0 alone, which FSDP's sharded parameters do not allow.
    if ctx.is_main and not ctx.sharded:
        for prompt in cfg.train.eval_prompts:
            reply = generate_reply(model, tokenizer, cfg.data.template, [Message("user", prompt)], max_new_tokens=64)
            samples.append({"prompt": prompt, "reply": reply})
    trainer.train(was_training)
    return {"eval_loss": float(total / max(count, 1)), **extra, "samples": samples}
