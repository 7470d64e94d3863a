"""`tuneforge eval` end to end on a tiny model: accuracy, files, loss against HF, --compare."""

import json
import math

import pytest
import torch
from helpers import write_jsonl

from tuneforge.cli import main
from tuneforge.data.records import Message
from tuneforge.eval.report import write_report
from tuneforge.eval.stats import wilson_interval
from tuneforge.generate import generate_reply

QUESTIONS = ["the fox", "What is two plus three?", "abc", "Natalia sold clips", "x y z"]
COLUMNS = "instruction=question,output=answer"


def _eval(model_dir, data, *extra):
    return main(["eval", str(model_dir), "--data", str(data), "--columns", COLUMNS, "--template", "chatml", *extra])


def test_exact_accuracy_files_and_ci(eval_model, eval_model_dir, tmp_path, capsys):
    model, tokenizer = eval_model
    replies = [generate_reply(model, tokenizer, "chatml", [Message("user", q)], max_new_tokens=6) for q in QUESTIONS]
    # references: the model's own answer for 3 records, something else for 2 -> accuracy 3/5 exactly
    answers = [replies[0], "wrong", replies[2], replies[3], "also wrong"]
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": q, "answer": a} for q, a in zip(QUESTIONS, answers)])
    out = tmp_path / "result.json"
    assert _eval(eval_model_dir, data, "--metric", "exact", "--max-new-tokens", "6", "--batch-size", "2",
                 "--out", str(out)) == 0
    summary = json.loads(out.read_text())
    assert summary["n"] == 5 and summary["correct"] == 3 and summary["accuracy"] == pytest.approx(0.6)
    assert summary["ci95"] == pytest.approx(list(wilson_interval(3, 5)))
    assert summary["metric"] == "exact" and summary["template"] == "chatml" and summary["adapter"] is None
    assert summary["tokens_per_s"] > 0 and summary["time_s"] > 0
    records = [json.loads(line) for line in (tmp_path / "result.samples.jsonl").read_text().splitlines()]
    assert [r["generation"] for r in records] == replies  # batched answers = one-by-one chat answers
    assert [r["correct"] for r in records] == [True, False, True, True, False]
    assert [r["prompt"] for r in records] == QUESTIONS and [r["reference"] for r in records] == answers
    assert "3/5 correct" in capsys.readouterr().out

    # --limit, --json
    assert _eval(eval_model_dir, data, "--metric", "exact", "--max-new-tokens", "6", "--limit", "2", "--json") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n"] == 2


def test_loss_metric_equals_hf_loss(eval_model, eval_model_dir, tmp_path, capsys):
    model, tokenizer = eval_model
    records = [{"question": q, "answer": f"answer {i} is five"} for i, q in enumerate(QUESTIONS[:3])]
    data = write_jsonl(tmp_path / "qa.jsonl", records)
    out = tmp_path / "loss.json"
    assert _eval(eval_model_dir, data, "--metric", "loss", "--batch-size", "2", "--out", str(out)) == 0
    per_sample = [json.loads(line) for line in (tmp_path / "loss.samples.jsonl").read_text().splitlines()]
    total = count = 0.0
    for record, got in zip(records, per_sample):
        prompt = f"<|im_start|>user\n{record['question']}<|im_end|>\n<|im_start|>assistant\n"
        ids = tokenizer(prompt + record["answer"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        labels = torch.tensor(ids)
        labels[: len(tokenizer(prompt, add_special_tokens=False)["input_ids"])] = -100  # only answer + end-of-turn
        with torch.no_grad():
            expected = model(input_ids=torch.tensor([ids]), labels=labels[None]).loss.item()
        n = int((labels[1:] != -100).sum())
        assert got["loss"] == pytest.approx(expected, abs=1e-5) and got["tokens"] == n
        total, count = total + expected * n, count + n
    summary = json.loads(out.read_text())
    assert summary["loss"] == pytest.approx(total / count, abs=1e-5)
    assert summary["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_compare_is_a_paired_test(tmp_path, capsys):
    def report(name, correct):
        records = [{"index": i, "reference": str(i), "correct": c} for i, c in enumerate(correct)]
        write_report(tmp_path / f"{name}.json", {"metric": "gsm8k", "accuracy": sum(correct) / len(correct)}, records)
        return str(tmp_path / f"{name}.json")

    a = report("a", [False] * 12 + [True] * 8)
    b = report("b", [True] * 10 + [False] * 2 + [True] * 8)  # B right on 10 where A was wrong, never the reverse
    assert main(["eval", "--compare", a, b, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["only_a"], result["only_b"], result["n"]) == (0, 10, 20)
    assert result["p_value"] == pytest.approx(2 / 1024) and result["significant"]
    assert result["difference"] == pytest.approx(0.5)
    c = report("c", [True] * 2 + [False] * 10 + [True] * 8)  # 2 flips only: not significant
    assert main(["eval", "--compare", a, c]) == 0
    assert "p = 0.5 (not significant" in capsys.readouterr().out
    other = tmp_path / "other.json"
    write_report(other, {"metric": "gsm8k"}, [{"index": 0, "reference": "x", "correct": True}])
    assert main(["eval", "--compare", a, str(other)]) == 2  # not the same samples


def test_user_errors_before_loading(eval_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "plain"}])
    assert _eval(eval_model_dir, data, "--metric", "regex") == 2  # no --pattern
    assert _eval(eval_model_dir, data, "--out", str(tmp_path / "missing" / "r.json")) == 2
    assert main(["eval", str(eval_model_dir), "--data", str(data)]) == 2  # no column mapping: missing 'instruction'
    assert main(["eval", str(eval_model_dir), "--data", str(text), "--format", "text", "--metric", "gsm8k"]) == 2
    assert main(["eval", str(tmp_path / "nope"), "--data", str(data), "--columns", COLUMNS]) == 2
    assert main(["eval", "--data", str(data)]) == 2
