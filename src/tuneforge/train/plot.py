"""`tuneforge plot RUN_DIR`: loss (train and eval), eval accuracy (`train.eval_metric`, on a right-hand
axis of the loss panel), learning rate and tokens/s over steps, as a PNG; for preference
objectives also the reward accuracy (train and eval)."""

from __future__ import annotations

from pathlib import Path

from tuneforge.errors import UserError
from tuneforge.train.metrics import read_metrics


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(Path(run_dir))
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        raise UserError(f"{run_dir} has no metrics.jsonl rows to plot", hint="pass a train.work_dir of a run")
    steps = [r["step"] for r in train]
    pairs = any(r.get("rewards/accuracies") is not None for r in train)  # a preference objective's run
    fig, axes = plt.subplots(4 if pairs else 3, 1, figsize=(8, 12 if pairs else 9), sharex=True)
    axes[0].plot(steps, [r["loss"] for r in train], label="train loss")
    if evals:
        axes[0].plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    axes[0].set_ylabel("loss")
    axes[0].legend(loc="upper left")
    scored = [r for r in evals if r.get("eval_accuracy") is not None]
    if scored:
        accuracy = axes[0].twinx()
        accuracy.plot([r["step"] for r in scored], [r["eval_accuracy"] for r in scored], "s--", color="tab:red",
                      label="eval accuracy")
        accuracy.set_ylabel("eval accuracy")
        accuracy.set_ylim(0, 1)
        accuracy.legend(loc="upper right")
    axes[1].plot(steps, [r["lr"] for r in train], color="tab:orange")
    axes[1].set_ylabel("learning rate")
    axes[2].plot(steps, [r["tokens_per_s"] for r in train], color="tab:green")
    axes[2].set_ylabel("tokens/s")
    if pairs:
        axes[3].plot(steps, [r.get("rewards/accuracies") for r in train], color="tab:purple", label="train")
        if evals:
            axes[3].plot([r["step"] for r in evals], [r.get("eval_rewards/accuracies") for r in evals], "o-",
                         color="tab:red", label="eval")
        axes[3].set_ylabel("reward accuracy")
        axes[3].set_ylim(-0.02, 1.02)
        axes[3].legend()
    axes[-1].set_xlabel("optimizer step")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(Path(run_dir).resolve().name)
    fig.tight_layout()
    target = Path(out) if out else Path(run_dir) / "metrics.png"
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target
