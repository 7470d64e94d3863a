"""The training loop against references: accumulation equivalence, exact resume after a
preemption and after a crash between checkpoints, falling loss, and generation that stops."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from tuneforge.cli import main
from tuneforge.train.loop import PREEMPTED_EXIT

from helpers import losses, train_then_sigkill


def weights(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("packing", ["soft", "none"])
def test_accumulation_equals_one_big_micro_batch(run_config, tmp_path, packing):
    runs = {}
    for micro, acc in [(4, 1), (2, 2), (1, 4)]:
        name = f"m{micro}a{acc}"
        cfg = run_config(name, train={"micro_batch_size": micro, "gradient_accumulation": acc, "max_steps": 3},
                         data={"packing": packing, "max_length": 64})
        assert main(["train", str(cfg)]) == 0
        runs[name] = (losses(tmp_path / name), weights(tmp_path / name / "final"))
    ref_loss, ref_w = runs.pop("m4a1")
    for name, (loss, w) in runs.items():
        assert loss == pytest.approx(ref_loss, abs=1e-5), name
        for key in ref_w:
            err = (w[key] - ref_w[key]).norm() / ref_w[key].norm()
            assert err < 1e-4, (name, key, float(err))


def test_preempted_run_resumes_bit_exact(run_config, tmp_path):
    sections = dict(train={"micro_batch_size": 2, "max_steps": 12, "save_every": 100},
                    model={"lora": {"r": 4, "alpha": 8, "dropout": 0.1}})
    assert main(["train", str(run_config("whole", **sections))]) == 0
    reference = losses(tmp_path / "whole")

    cfg = run_config("parts", **sections)
    metrics = tmp_path / "parts" / "metrics.jsonl"

    def preempt_after_step_5():
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=preempt_after_step_5)
    thread.start()
    assert main(["train", str(cfg)]) == PREEMPTED_EXIT
    thread.join()
    stopped = len(losses(tmp_path / "parts"))
    assert 5 <= stopped < 12
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(tmp_path / "parts") == reference  # bit for bit
    assert weights(tmp_path / "parts" / "final").keys() == weights(tmp_path / "whole" / "final").keys()
    for key, value in weights(tmp_path / "whole" / "final").items():
        assert torch.equal(value, weights(tmp_path / "parts" / "final")[key])


def test_crash_between_checkpoints_resumes_bit_exact(run_config, tmp_path):
    sections = dict(train={"micro_batch_size": 2, "max_steps": 10, "save_every": 3, "keep_last": 1},
                    data={"sampler": "length_grouped", "packing": "none"})
    assert main(["train", str(run_config("whole", **sections))]) == 0
    reference = losses(tmp_path / "whole")

    cfg = run_config("crash", **sections)
    train_then_sigkill(cfg, tmp_path / "crash" / "metrics.jsonl", rows=8)
    checkpoints = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert checkpoints[-1] in ("step_6", "step_9"), checkpoints
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(tmp_path / "crash") == reference


def test_lora_30_steps_lowers_the_loss(run_config, tmp_path):
    data = tmp_path / "fox.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Sentence {i}?", "output": "The quick brown fox jumps over the lazy dog."})
                            + "\n" for i in range(64)))
    cfg = run_config("lora", data_path=data, train={"micro_batch_size": 4, "max_steps": 30, "lr": 1e-2},
                     model={"lora": {"r": 8, "alpha": 16, "dropout": 0.0}})
    assert main(["train", str(cfg)]) == 0
    curve = losses(tmp_path / "lora")
    assert len(curve) == 30
    # the frozen random LM head caps logits near +-1.3, so LoRA alone floors around 4.6 here
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 0.5
    assert (tmp_path / "lora" / "final" / "adapter_model.safetensors").is_file()


def test_fine_tuned_model_reproduces_the_answer_and_stops(run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.data.records import Message
    from tuneforge.generate import generate_reply
    from tuneforge.model.load import load_tokenizer

    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"instruction": "What is two plus three?", "output": "Two plus three is five."})
                            + "\n" for _ in range(16)))
    cfg = run_config("memorise", data_path=data, train={"micro_batch_size": 4, "max_steps": 40, "lr": 1e-2,
                                                        "warmup_ratio": 0.0}, data={"packing": "none"})
    assert main(["train", str(cfg)]) == 0
    final = tmp_path / "memorise" / "final"
    model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    tokenizer = load_tokenizer(final)
    reply = generate_reply(model, tokenizer, "chatml", [Message("user", "What is two plus three?")], max_new_tokens=30)
    assert reply == "Two plus three is five."  # and it stopped at <|im_end|> instead of running on
