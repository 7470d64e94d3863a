"""`tuneforge convert-config`: XTuner / InternEvo .py configs read without running them, as YAML
that validates, plans and check-datas on stand-in data, with every unmapped setting commented."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import alpaca_records, make_tiny_model, write_jsonl

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.convert.pyconfig import Opaque, Unknown, read_py_config
from tuneforge.convert.run import convert_file

FIXTURES = Path(__file__).parent.parent / "fixtures"


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory, tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-chat", tokenizer)


@pytest.fixture()
def workspace(tmp_path, monkeypatch, tiny_chat, tokenizer):
    """A working directory holding what the fixtures name: models/tiny-chat and data/..."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny-chat").symlink_to(tiny_chat)
    data = tmp_path / "data"
    data.mkdir()
    records = alpaca_records(40)
    write_jsonl(data / "alpaca.jsonl", records)
    write_jsonl(data / "chat.jsonl", [{"messages": [{"role": "user", "content": r["instruction"]},
                                                    {"role": "assistant", "content": r["output"]}]} for r in records])
    write_jsonl(data / "conversation.jsonl", [{"conversation": [{"system": "Be brief.", "input": r["instruction"],
                                                                 "output": r["output"]}]} for r in records])
    from tuneforge.data.internevo import write_internevo

    encoded = [tokenizer(r["instruction"] + " " + r["output"])["input_ids"] for r in records]
    lengths = np.array([len(e) for e in encoded])
    tokens = np.concatenate([np.array(e) for e in encoded])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    trained = np.ones(len(tokens), dtype=bool)
    write_internevo(type("Enc", (), {"tokens": tokens, "trained": trained, "offsets": offsets})(),
                    data / "tokenized" / "part-0.bin")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def convert(capsys, fixture, *args):
    code = main(["convert-config", str(FIXTURES / fixture), "-o", "out.yaml", "--gpus", "2", *args])
    out = capsys.readouterr()
    assert code == 0, out.err
    return Path("out.yaml"), out.out


def plan_and_check(capsys, out: Path) -> dict:
    assert main(["plan", str(out), "--gpus", "2", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model_params"] > 0
    assert main(["check-data", str(out), "--json", "data.cache_dir=cache"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] > 0 and report["tokens"] > 0
    return report


def test_xtuner_qlora_chat(workspace, capsys):
    out, printed = convert(capsys, "xtuner_qlora_chat.py")
    cfg = load_config(out)
    assert cfg.model.path == str((workspace / "models" / "tiny-chat").resolve())
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (32, 16, 0.1)
    assert cfg.model.lora.target_modules == "all-linear" and cfg.model.quantization.bits == 4
    assert cfg.model.dtype == "bfloat16" and cfg.model.trust_remote_code is False
    assert cfg.model.gradient_checkpointing is True  # SupervisedFinetune checkpoints activations by default
    assert cfg.data.template == "internlm2_chat" and cfg.data.max_length == 64 and cfg.data.packing == "hard"
    assert [(Path(d.path).name, d.format) for d in cfg.data.datasets] == [("chat.jsonl", "openai")]
    t = cfg.train
    assert (t.micro_batch_size, t.gradient_accumulation, t.epochs, t.lr, t.max_grad_norm) == (1, 8, 2, 2e-4, 1.0)
    assert (t.warmup_ratio, t.save_every, t.keep_last, t.eval_every, t.log_every) == (0.03, 100, 3, 50, 10)
    assert t.eval_prompts == ["What is two plus three?", "Name a lazy animal."]
    assert cfg.parallel.strategy == "ddp"  # QLoRA without --deepspeed: not FSDP
    # the global batch, both ways, with the GPU count it assumes
    assert "1 x 8 x 2/1 = 16 rows of 64 tokens" in printed and "1 x 8 x 2/(1 x 1) = 16 rows" in printed
    text = out.read_text()
    assert "on 2 GPUs" in text and "NPROC_PER_NODE=2 tuneforge train out.yaml" in text
    # unmapped settings are comments with what tuneforge does instead; mapped ones are not listed
    assert "#   betas = (0.9, 0.999): tuneforge's AdamW uses betas (0.9, 0.999)" in text
    assert "#   SYSTEM = 'You are a helpful assistant.': eval_prompts are generated without a system prompt" in text
    assert "#   env_cfg = dict(" in text and "#   lr = " not in text and "#   max_length = " not in text
    plan_and_check(capsys, out)


def test_xtuner_mixtral_lora_length_grouped(workspace, capsys):
    out, printed = convert(capsys, "xtuner_mixtral_lora.py", "--deepspeed", "deepspeed_zero3")
    cfg = load_config(out)
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]  # fused experts dropped
    assert "w1/w2/w3 dropped" in out.read_text()
    assert [(Path(d.path).name, d.format) for d in cfg.data.datasets] == [("alpaca.jsonl", "alpaca"),
                                                                         ("conversation.jsonl", "xtuner")]
    assert (cfg.data.template, cfg.data.packing, cfg.data.sampler, cfg.data.max_length) == ("mistral", "none",
                                                                                           "length_grouped", 48)
    assert cfg.train.min_lr_ratio == pytest.approx(0.1) and cfg.train.keep_last >= 1000 and cfg.train.seed == 7
    assert (cfg.parallel.strategy, cfg.parallel.zero) == ("deepspeed", 3)
    assert "tuneforge train out.yaml --deepspeed zero3" in out.read_text()
    assert "2 x 2 x 2/1 = 8 rows" in printed
    plan_and_check(capsys, out)


def test_xtuner_full_sequence_parallel(workspace, capsys):
    out, printed = convert(capsys, "xtuner_full_deepspeed_sp.py", "--deepspeed", "deepspeed_zero3")
    cfg = load_config(out)
    assert cfg.model.attn_implementation == "varlen" and cfg.model.lora is None
    assert cfg.parallel.sequence_parallel == 2 and cfg.parallel.strategy == "fsdp"  # Ulysses runs under FSDP only
    assert cfg.train.gradient_accumulation == 4  # accumulative_counts *= sequence_parallel_size
    assert cfg.train.warmup_ratio == 0.025 and cfg.train.min_lr_ratio == pytest.approx(0.15)
    assert "1 x 4 x 2/2 = 4 rows of 64 tokens" in printed and "1 x 4 x 2/(2 x 1) = 4 rows" in printed
    assert "{{ fileDirname }}/vis_data" in out.read_text()  # placeholders are kept as written, in a comment
    plan_and_check(capsys, out)


def test_internevo_sft(workspace, capsys):
    out, printed = convert(capsys, "internevo_7b_sft.py")
    cfg = load_config(out)
    [ds] = cfg.data.datasets
    assert (Path(ds.path).name, ds.format, ds.min_length) == ("tokenized", "internevo", 5)
    assert (cfg.data.max_length, cfg.data.packing) == (64, "hard")
    t = cfg.train
    assert (t.micro_batch_size, t.gradient_accumulation, t.max_steps, t.lr, t.weight_decay) == (2, 4, 30, 1e-4, 0.01)
    assert (t.warmup_ratio, t.save_every, t.max_grad_norm) == (0.01, 20, 1.0)
    assert t.min_lr_ratio == pytest.approx(0.1) and t.work_dir.endswith("tiny_sft")
    # tensor size 2 in mode isp = sequence parallel; weight parallel = parameters sharded
    assert (cfg.parallel.strategy, cfg.parallel.zero, cfg.parallel.sequence_parallel) == ("fsdp", 3, 2)
    assert "4 x 2 x 2/(2 x 1) = 8 rows of 64 tokens" in printed and "2 x 4 x 2/(2 x 1) = 8 rows" in printed
    text = out.read_text()
    assert "#   ckpt.oss_snapshot_freq = 10: " in text  # int(CHECKPOINT_EVERY / 2)
    assert "#   adam.adam_beta2 = 0.95: " in text and "#   HIDDEN_SIZE = 64: the architecture" in text
    report = plan_and_check(capsys, out)
    assert report["samples"] == 40


def test_internevo_pipeline_ranks_become_data_parallel(tmp_path):
    source = (FIXTURES / "internevo_7b_sft.py").read_text().replace(
        'tensor=dict(size=2, mode="isp")', 'tensor=dict(size=1, mode="mtp")').replace(
        "pipeline=dict(size=1,", "pipeline=dict(size=2,")
    (tmp_path / "pp.py").write_text(source)
    draft = convert_file(str(tmp_path / "pp.py"), gpus=8)
    # InternEvo: 4 x 2 x 8/(1 x 2) = 32 rows; here 8 data-parallel ranks, so accumulation 2
    assert draft.values["train"]["gradient_accumulation"] == 2
    assert any("= 32 rows" in line for line in draft.summary) and not any("WARNING" in s for s in draft.summary)
    with pytest.raises(Exception, match="not a multiple"):
        convert_file(str(tmp_path / "pp.py"), gpus=3)


def test_values_that_need_running_the_file_are_named_not_guessed(tmp_path):
    source = (FIXTURES / "xtuner_qlora_chat.py").read_text()
    source = source.replace("batch_size = 1  # per device", "batch_size = get_batch_size()  # per device")
    source = source.replace("save_steps = 100", "save_steps = -1")
    (tmp_path / "c.py").write_text(source)
    draft = convert_file(str(tmp_path / "c.py"), gpus=2)
    assert draft.values["train"]["micro_batch_size"] == 1 and draft.values["train"]["save_every"] == 0
    assert any(line.startswith("Not evaluated: train_dataloader.batch_size = get_batch_size()") for line in draft.header)
    assert "save_steps=-1" in draft.notes[("train", "save_every")]


def test_refuses_to_overwrite_without_force(workspace, capsys):
    Path("out.yaml").write_text("mine\n")
    code = main(["convert-config", str(FIXTURES / "xtuner_qlora_chat.py"), "-o", "out.yaml"])
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert Path("out.yaml").read_text() == "mine\n"
    assert main(["convert-config", str(FIXTURES / "xtuner_qlora_chat.py"), "-o", "out.yaml", "--force"]) == 0
    assert yaml.safe_load(Path("out.yaml").read_text())["data"]["template"] == "internlm2_chat"


def test_not_a_known_config_is_one_line(tmp_path, capsys):
    (tmp_path / "other.py").write_text("x = 1\n")
    assert main(["convert-config", str(tmp_path / "other.py")]) == 2
    assert "neither an XTuner config" in capsys.readouterr().err
    (tmp_path / "broken.py").write_text("x = (\n")
    assert main(["convert-config", str(tmp_path / "broken.py")]) == 2
    assert "broken.py:1: not valid Python" in capsys.readouterr().err


def test_reader_evaluates_only_the_safe_subset(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "c.py").write_text(f"""
import torch
from xtuner.utils import PROMPT_TEMPLATE as PT
A = 2 ** 4
B = A * 3 - 1
B += 1
C = 8 / 3
S = f"run_{{A}}"
D = dict(x=A, y=[A, B], **dict(z="zed"))
E = {{"k": D["y"][1], "t": torch.float16}}
F = "big" if A > 10 else "small"
G = PT.internlm2_chat
H = int(C)
I = __import__("os").system("touch {marker}")
J = open("{marker}", "w")
K = [n for n in range(3)]
if A > 100:
    L = 1
else:
    L = 2
if I:
    M = 3
""")
    cfg = read_py_config(tmp_path / "c.py")
    v = cfg.values
    assert (v["A"], v["B"], v["S"], v["F"], v["H"], v["L"]) == (16, 48, "run_16", "big", 2, 2)
    assert v["C"] == pytest.approx(8 / 3)
    assert v["D"] == {"x": 16, "y": [16, 48], "z": "zed"}
    assert v["E"] == {"k": 48, "t": Opaque("torch.float16")}
    assert v["G"] == Opaque("PROMPT_TEMPLATE.internlm2_chat")
    assert all(isinstance(v[k], Unknown) for k in "IJK") and "M" not in v
    assert not marker.exists()  # nothing was executed
    assert any("if I:" in what for _, what in cfg.skipped)
    assert {"torch", "PT"} <= cfg.imports and "A" not in cfg.imports
