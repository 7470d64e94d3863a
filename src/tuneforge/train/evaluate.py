"""Evaluation during training: token-exact loss on eval data, a task metric, sample generations.

`evaluate` computes, on every rank, the mean CE over all eval loss tokens; on rank 0 (not
when parameters are sharded) the `train.eval_prompts` replies and, with `train.eval_metric`,
the accuracy of greedy answers to the first `train.eval_metric_samples` eval samples
(`tuneforge.eval.generation`: the same batched generation and scoring as `tuneforge eval`).
`Evaluator` is what the loop calls: it pauses the training bar, shows an eval bar (rows, then
samples, with an ETA), writes the metrics row with `eval_seconds`, and returns the seconds
spent so that the loop keeps them out of the step time and tokens/s.
"""

from __future__ import annotations

import contextlib
import time

import torch

from tuneforge.data.records import Message

GENERATION_BATCH = 8  # answers generated at once for train.eval_metric


def metric_items(cfg, eval_data, limit: int) -> list:
    """The first `limit` samples of the eval data (dataset by dataset, in file order) as EvalItems."""
    from tuneforge.data.records import read_samples
    from tuneforge.eval.items import to_item

    entries = cfg.data.eval_datasets or cfg.data.datasets
    wanted: dict[str, set[int]] = {}
    for sample in sorted(set(int(s) for s in eval_data.packs.pieces[:, 0])):
        store, local = eval_data.locate(sample)
        wanted.setdefault(store.name, set()).add(int(store.origin[local]))
    items = []
    for entry in entries:
        origins = wanted.get(str(entry.path))
        if not origins or entry.format in ("internevo", "text"):  # no prompt/answer records to generate from
            continue
        samples = read_samples(entry.path, entry.format, entry.columns, entry.system)
        items += [to_item(i, samples[i]) for i in sorted(origins)]
        if len(items) >= limit:
            break
    return [item for item in items if item.prompt][:limit]


@torch.no_grad()
def evaluate(trainer, model, eval_data, tokenizer, cfg, ctx, device, objective=None, *, items=None, task=None) -> dict:
    """{'eval_loss': mean CE over all eval loss tokens, 'samples': [{prompt, reply}, ...]} and, with
    `items` (rank 0), 'eval_accuracy' and 'eval_samples'.

    `trainer` is the (possibly wrapped) loss module, `model` the causal LM it holds, `objective`
    the unwrapped module (`tuneforge.train.objective`): a preference objective's eval_loss is
    the mean over eval pairs, and its metrics come as eval_rewards/accuracies and the like.
    `task(total, desc, unit)` opens a progress bar (`Progress.task`).
    """
    from tuneforge.data.collate import collate_rows
    from tuneforge.generate import generate_reply

    task = task or _no_bar
    was_training = trainer.training
    trainer.eval()
    total, count = torch.zeros((), device=device, dtype=torch.float64), 0
    rows = list(range(ctx.dp_rank, len(eval_data), ctx.dp_size))
    size = cfg.train.micro_batch_size
    # Under FSDP every forward is a collective (parameter all-gathers): all ranks run the same
    # number of batches, a rank with fewer rows repeating one with its loss discarded.
    batches = -(-len(range(0, len(eval_data), ctx.dp_size)) // size) if ctx.sharded else -(-len(rows) // size)
    with task(len(rows), "eval loss", "row") as advance:
        for index in range(batches):
            chunk = rows[index * size: (index + 1) * size]
            batch = collate_rows([eval_data.row(r) for r in chunk or rows[:1] or [0]], tokenizer.pad_token_id)
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            part = trainer(batch).double()
            if chunk:
                total += part
                count += objective.loss_items(batch) if objective is not None else batch["num_loss_tokens"]
                advance(len(chunk))
            elif objective is not None:
                objective.forget_last()
    total, count = ctx.all_reduce_sum(total), ctx.all_reduce_sum(count)
    extra = objective.take_metrics(ctx, prefix="eval_") if objective is not None else {}
    result = {"eval_loss": float(total / max(count, 1)), **extra}
    samples = []
    # Generation runs on rank 0 alone, which FSDP's sharded parameters do not allow.
    if ctx.is_main and not ctx.sharded:
        if items:
            from tuneforge.eval.generation import generate_and_score
            from tuneforge.eval.metrics import Scorer

            scorer = Scorer(cfg.train.eval_metric, cfg.train.eval_metric_pattern)
            with task(len(items), f"eval {cfg.train.eval_metric}", "sample") as advance:
                _, summary = generate_and_score(model, tokenizer, cfg.data.template, items, scorer,
                                                cfg.train.eval_max_new_tokens, GENERATION_BATCH, progress=advance)
            result.update(eval_accuracy=summary["accuracy"], eval_samples=summary["n"])
        for prompt in cfg.train.eval_prompts:
            reply = generate_reply(model, tokenizer, cfg.data.template, [Message("user", prompt)], max_new_tokens=64)
            samples.append({"prompt": prompt, "reply": reply})
    trainer.train(was_training)
    return {**result, "samples": samples}


def _no_bar(total, desc, unit):
    return contextlib.nullcontext(lambda n=1: None)


class Evaluator:
    """One evaluation as the loop runs it: eval bar, metrics row (with `eval_seconds`), timing."""

    def __init__(self, trainer, model, eval_data, tokenizer, cfg, ctx, device, metrics, progress, objective=None):
        self.args = (trainer, model, eval_data, tokenizer, cfg, ctx, device, objective)
        self.cfg, self.ctx, self.metrics, self.progress = cfg, ctx, metrics, progress
        self.items = None

    def _items(self):
        cfg = self.cfg
        if not cfg.train.eval_metric or not self.ctx.is_main or self.ctx.sharded:
            return None
        if self.items is None:
            self.items = metric_items(cfg, self.args[2], cfg.train.eval_metric_samples)
            if not self.items:
                self.progress.note("train.eval_metric: the eval data holds no prompt/answer records; accuracy not logged")
        return self.items

    def run(self, step: int) -> float:
        """Evaluate, log the row for `step`; returns the seconds it took."""
        started = time.time()
        self.progress.pause()
        result = evaluate(*self.args, items=self._items(), task=self.progress.task)
        seconds = time.time() - started
        self.metrics.write({"step": step, **result, "eval_seconds": seconds})
        accuracy = f", eval_accuracy {result['eval_accuracy']:.4f}" if result.get("eval_accuracy") is not None else ""
        self.progress.note(f"step {step}: eval_loss {result['eval_loss']:.4f}{accuracy} ({seconds:.1f}s)")
        self.progress.resume()
        return seconds
