"""Training options against their references: gradient checkpointing and the attention
implementation change nothing numerically; a non-finite loss stops the run (or is skipped)."""

import pytest
from helpers import losses

from tuneforge.cli import main


@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8, "dropout": 0.0}])
def test_gradient_checkpointing_and_attention_do_not_change_the_losses(run_config, tmp_path, lora):
    curves = {}
    for name, model in {"plain": {}, "ckpt": {"gradient_checkpointing": True},
                        "sdpa": {"attn_implementation": "sdpa"}, "eager": {"attn_implementation": "eager"}}.items():
        cfg = run_config(name, train={"micro_batch_size": 2, "max_steps": 3}, model={"lora": lora, **model},
                         data={"packing": "soft"})
        assert main(["train", str(cfg)]) == 0
        curves[name] = losses(tmp_path / name)
    for name in ("ckpt", "sdpa", "eager"):
        assert curves[name] == pytest.approx(curves["plain"], abs=1e-5), name


def test_non_finite_loss_stops_or_is_skipped(run_config, tmp_path, capsys):
    cfg = run_config("nan", train={"max_steps": 4, "lr": 1e20, "warmup_ratio": 0.0, "max_grad_norm": 0.0})
    assert main(["train", str(cfg)]) == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: non-finite loss") and "samples [('" in errors[0]
    assert not (tmp_path / "nan" / "final").exists()
    cfg = run_config("skip", train={"max_steps": 4, "lr": 1e20, "warmup_ratio": 0.0, "max_grad_norm": 0.0,
                                    "skip_nonfinite": True})
    assert main(["train", str(cfg)]) == 0
    assert "skipped (non-finite" in capsys.readouterr().err


def test_compiled_blocks_train_like_eager(run_config, tmp_path):
    """model.compile (each decoder block, LoRA inside, packed varlen rows) gives the eager losses,
    and the final adapter holds the same keys."""
    lora = {"r": 4, "alpha": 8, "dropout": 0.0}
    from torch._dynamo.utils import counters

    curves, graphs = {}, {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        cfg = run_config(name, train={"micro_batch_size": 2, "max_steps": 3}, data={"packing": "soft"},
                         model={"lora": lora, "attn_implementation": "varlen", "compile": compile_})
        before = counters["stats"]["unique_graphs"]
        assert main(["train", str(cfg)]) == 0
        curves[name], graphs[name] = losses(tmp_path / name), counters["stats"]["unique_graphs"] - before
    assert graphs["eager"] == 0 and graphs["compiled"] > 0  # dynamo really compiled the blocks
    assert len(curves["compiled"]) == 3
    assert curves["compiled"] == pytest.approx(curves["eager"], abs=1e-5)
    from safetensors.torch import load_file

    eager, compiled = (load_file(tmp_path / n / "final" / "adapter_model.safetensors") for n in ("eager", "compiled"))
    assert eager.keys() == compiled.keys()
    assert all(float((eager[k] - compiled[k]).abs().max()) <= 1e-5 for k in eager)
