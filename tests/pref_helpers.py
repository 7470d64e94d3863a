"""Builders for the preference tests: pair records in TRL's forms and configs that train on them."""

from __future__ import annotations

import json
import random
from pathlib import Path

from helpers import write_config, write_jsonl

WORDS = "the fox jumps over lazy dog two plus three is five clips friends April May".split()


def pair_records(n: int, seed: int = 0, form: str = "conversational", max_words: int = 12):
    """`n` pairs: chosen and rejected answers of different lengths to one prompt.

    form: conversational (TRL's message lists), strings, or implicit (whole conversations
    that share the prompt)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choices(WORDS, k=rng.randint(2, 10)))
        chosen = " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))
        rejected = " ".join(rng.choices(WORDS, k=rng.randint(1, max_words)))
        if form == "strings":
            records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
            continue
        user = [{"role": "user", "content": prompt}]
        answer = [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}]
        if form == "implicit":
            records.append({"chosen": user + answer[0], "rejected": user + answer[1]})
        else:
            records.append({"prompt": user, "chosen": answer[0], "rejected": answer[1]})
    return records


def pref_config(tmp_path, model_dir, name: str, objective: str = "dpo", n_pairs: int = 24, data_path=None, **sections):
    """tmp_path/NAME.yaml: `objective` on `n_pairs` pairs (written once per tmp_path) in run tmp_path/NAME."""
    data = data_path or tmp_path / "pairs.jsonl"
    if not data.exists():
        write_jsonl(data, pair_records(n_pairs))
    train = {"objective": objective, "lr": 1e-3, "warmup_ratio": 0.0, "seed": 3, "max_steps": 3,
             "micro_batch_size": 2, "work_dir": str(tmp_path / name), **sections.pop("train", {})}
    return write_config(tmp_path / f"{name}.yaml", model_dir, [{"path": str(data), "format": "preference"}],
                        train=train, **sections)


def metric_rows(run: Path, kind: str = "loss") -> list[dict]:
    """The rows of run/metrics.jsonl holding `kind` (training steps: "loss"; evaluations: "eval_loss")."""
    rows = [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if kind in row and (kind != "loss" or "eval_loss" not in row)]


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out
