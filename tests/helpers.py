"""Builders shared by the tests: a tiny ChatML tokenizer, tiny models, data and config writers."""

from __future__ import annotations

import json
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is two plus three? Two plus three is five. #### 5",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "system user assistant You are a helpful assistant. Answer the question step by step.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 + - * / = ? ! , . ; : ' \" ( ) [ ] { } < > # @ $ % & _",
    "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ",
]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer with ChatML specials and template (fast, ~50 ms)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   unk_token="<unk>", pad_token="<|im_end|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIAL[3:]})
    fast.chat_template = CHATML_TEMPLATE
    return fast


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_config(path: Path, tokenizer_dir, datasets, **sections) -> Path:
    """A YAML config for tests; `sections` update model/data/train/parallel keys."""
    import yaml

    tree = {"model": {"path": str(tokenizer_dir), "dtype": "float32"},
            "data": {"datasets": datasets, "max_length": 64, "cache_dir": str(path.parent / "cache"), "template": "chatml"},
            "train": {"work_dir": str(path.parent / "run")}}
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def alpaca_records(n: int, seed: int = 0):
    import random

    rng = random.Random(seed)
    words = "the fox jumps over lazy dog two plus three is five clips friends April May".split()
    return [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 12))),
             "output": " ".join(rng.choices(words, k=rng.randint(1, 15)))} for _ in range(n)]


def make_tiny_model(path, tokenizer, seed=0, tie=False, kv_heads=2):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=256,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def preempt_after(metrics_file, steps: int):
    """A started thread that sends this process SIGUSR1 once `metrics_file` holds `steps` rows
    (the loop then saves a checkpoint and returns PREEMPTED_EXIT); join it after the run."""
    import os
    import signal
    import threading
    import time

    def watch():
        while not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= steps):
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGUSR1)

    thread = threading.Thread(target=watch)
    thread.start()
    return thread


def train_then_sigkill(cfg, metrics: Path, rows: int) -> None:
    """`tuneforge train cfg` in a child process, SIGKILLed (no chance to save) once `metrics`
    holds `rows` lines (or when it ends by itself)."""
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= rows):
        time.sleep(0.001)
    proc.kill()
    proc.wait()


def losses(work_dir):
    rows = [json.loads(line) for line in (work_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


# ---- packed batches vs samples one by one (attention and loss references) -------------------

def make_samples(lengths=(5, 9, 3, 7), vocab=128, prompt_in=1):
    """(input_ids, HF-style unshifted labels) per sample; sample `prompt_in` starts with a 4-token prompt."""
    import torch

    gen = torch.Generator().manual_seed(1)
    samples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(1, vocab, (n,), generator=gen)
        labels = ids.clone()
        if i == prompt_in:
            labels[:4] = -100
        samples.append((ids, labels))
    return samples


def packed_batch(samples, rows, row_len, pad_id=0):
    """The batch the real collator builds from `samples` packed as `rows` (lists of sample indices)."""
    from tuneforge.data.collate import collate_rows

    pieces = [[(samples[i][0].numpy(), (samples[i][1] != -100).numpy(), ("test", i)) for i in row] for row in rows]
    return collate_rows(pieces, pad_id=pad_id, length=row_len)


def one_by_one(model, samples):
    """Reference: unpadded samples with the model's default attention and HF's shifted loss."""
    total = sum(int((y[1:] != -100).sum()) for _, y in samples)
    model.zero_grad()
    loss = sum(model(input_ids=x[None], labels=y[None], num_items_in_batch=total).loss for x, y in samples)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
