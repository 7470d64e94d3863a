"""The bad-input matrix: every user mistake is one `error:` line naming what is wrong, a
non-zero exit, no traceback, and nothing half-written in the work dir."""

import json
import re
import shutil

import pytest
import yaml
from helpers import alpaca_records, make_tiny_model, write_config, write_jsonl

from tuneforge.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import build_tokenizer

    return make_tiny_model(tmp_path_factory.mktemp("bad_inputs_model"), build_tokenizer())


def run(capsys, *args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def expect(capsys, pattern, *args, code=2):
    got, err = run(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert got == code, err
    assert len(errors) == 1, err
    assert "Traceback" not in err
    assert re.search(pattern, errors[0]), errors[0]


def config(tmp_path, model_dir, records=None, data_text=None, fmt="alpaca", name="d.jsonl", **sections):
    data = tmp_path / name
    if data_text is not None:
        data.write_text(data_text)
    elif records is not None:
        write_jsonl(data, records)
    sections.setdefault("train", {}).setdefault("max_steps", 1)
    return write_config(tmp_path / "c.yaml", model_dir, [{"path": name, "format": fmt}], **sections)


def nothing_written(tmp_path):
    run_dir = tmp_path / "run"
    return not (run_dir / "final").exists() and not (run_dir / "checkpoints").exists()


DATA_CASES = [
    ("malformed JSON line", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output"\n', "alpaca",
     r"d\.jsonl:2: malformed JSON"),
    ("missing field", '{"instruction": "a"}\n', "alpaca", r"d\.jsonl:1: missing field 'output'"),
    ("non-string field", '{"instruction": 3, "output": "b"}\n', "alpaca", "field 'instruction' must be a str"),
    ("record not an object", '["a", "b"]\n', "alpaca", "expected a JSON object per record"),
    ("unknown role", '{"messages": [{"role": "wizard", "content": "x"}]}\n', "openai", "unknown role 'wizard'"),
    ("empty conversation", '{"messages": []}\n', "openai", "empty conversation"),
    ("no assistant turn", '{"messages": [{"role": "user", "content": "x"}]}\n', "openai", "no assistant turn"),
    ("unknown speaker", '{"conversations": [{"from": "robot", "value": "x"}]}\n', "sharegpt", "unknown speaker"),
    ("xtuner turn without output", '{"conversation": [{"input": "x"}]}\n', "xtuner", "missing or non-string 'output'"),
    ("empty text", '{"text": ""}\n', "text", "empty text"),
    ("empty dataset", "\n\n", "alpaca", "is empty"),
]


@pytest.mark.parametrize("case,text,fmt,pattern", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data(capsys, tmp_path, model_dir, case, text, fmt, pattern):
    cfg = config(tmp_path, model_dir, data_text=text, fmt=fmt)
    expect(capsys, pattern, "train", cfg)
    assert nothing_written(tmp_path)


def test_wrong_top_level_type(capsys, tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, data_text='"a string"', name="d.json")
    expect(capsys, "expected a JSON list of records", "train", cfg)


def test_all_samples_dropped(capsys, tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, records=alpaca_records(5), data={"truncation": "drop", "max_length": 8})
    expect(capsys, r"every sample of .* was dropped \(5 longer than data.max_length=8", "train", cfg)


def test_missing_data_file_and_empty_folder(capsys, tmp_path, model_dir):
    cfg = config(tmp_path, model_dir, name="nope.jsonl")
    expect(capsys, "data file not found: .*nope.jsonl", "train", cfg)
    (tmp_path / "folder").mkdir()
    cfg = config(tmp_path, model_dir, name="folder")
    expect(capsys, "holds no .json/.jsonl files", "train", cfg)


CONFIG_CASES = [
    ("unknown format", {"data": {"datasets": [{"path": "d.jsonl", "format": "alpacca"}]}}, r"did you mean 'alpaca'"),
    ("unknown key", {"train": {"learning_rate": 1}}, r"c\.yaml:\d+: unknown key 'train.learning_rate'"),
    ("unknown section", {"trian": {"lr": 1}}, r"unknown key 'trian' \(did you mean 'train'\?\)"),
    ("wrong type", {"train": {"epochs": "many"}}, "train.epochs: input should be a valid integer"),
    ("negative lr", {"train": {"lr": -1e-4}}, "train.lr: input should be greater than 0"),
    ("zero batch", {"train": {"micro_batch_size": 0}}, "train.micro_batch_size: input should be greater than 0"),
    ("max_length below 2", {"data": {"max_length": 1}}, "data.max_length: input should be greater than or equal to 2"),
    ("unknown template", {"data": {"template": "llama9"}}, "unknown template 'llama9'"),
    ("quantization without lora", {"model": {"quantization": {"bits": 4}}}, "needs model.lora"),
    ("eval_split without eval_every", {"data": {"eval_split": 0.3}},
     r"data.eval_split is 0.3 but train.eval_every is 0: 30% of the data would be held out"),
    ("eval_every without eval data", {"train": {"eval_every": 2}}, r"train.eval_every is 2 but there is no eval data"),
]


@pytest.mark.parametrize("case,sections,pattern", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(capsys, tmp_path, model_dir, case, sections, pattern):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    path = config(tmp_path, model_dir)
    tree = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        if section in tree and isinstance(tree[section], dict):
            tree[section].update(values)
        else:
            tree[section] = values
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    expect(capsys, pattern, "train", path)
    assert nothing_written(tmp_path)


def test_yaml_errors_and_missing_config(capsys, tmp_path):
    (tmp_path / "broken.yaml").write_text("model:\n  path: [unclosed\n")
    expect(capsys, r"broken\.yaml:\d+: not valid YAML", "train", tmp_path / "broken.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    expect(capsys, "must be a mapping of sections", "train", tmp_path / "list.yaml")
    expect(capsys, "config file not found", "train", tmp_path / "missing.yaml")


def test_duplicate_yaml_key(capsys, tmp_path, model_dir):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    path = config(tmp_path, model_dir)
    path.write_text(path.read_text() + "train:\n  lr: 1.0e-3\n")
    lines = path.read_text().splitlines()
    expect(capsys, rf"c\.yaml:{len(lines) - 1}: duplicate key 'train' \(first on line \d+\)", "train", path)


def test_missing_path_hint_names_where_the_path_was_written(capsys, tmp_path, model_dir):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    cfg = config(tmp_path, model_dir)
    expect(capsys, r"data file not found: .*nope.jsonl \(data.datasets.0.path was given on the command line; paths on "
                   r"the command line are relative to the working directory\)", "train", cfg,
           "data.datasets.0.path=nope.jsonl")
    cfg = config(tmp_path, model_dir, name="nope.jsonl")
    expect(capsys, r"data file not found: .*nope.jsonl \(data.datasets.0.path is set at .*c\.yaml:\d+; paths in a "
                   r"config file are relative to the file", "train", cfg)
    expect(capsys, r"model folder not found: .*nowhere \(model.path was given on the command line", "train", cfg,
           f"model.path={tmp_path / 'nowhere'}")


def test_bad_override(capsys, tmp_path, model_dir):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    cfg = config(tmp_path, model_dir)
    expect(capsys, "command-line override: unknown key 'train.lrr'", "train", cfg, "train.lrr=1")
    expect(capsys, "override 'train.lr=' has an empty|input should be", "train", cfg, "train.lr=")


MODEL_CASES = ["missing folder", "no weights", "pickle weights", "remote code", "no chat template", "8-bit qlora on cpu"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model(capsys, tmp_path, model_dir, case):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    model = {"path": str(broken)}
    data = {}
    if case == "missing folder":
        model["path"] = str(tmp_path / "nowhere")
        pattern = "not found"
    elif case == "no weights":
        for f in broken.glob("*.safetensors"):
            f.unlink()
        pattern = "has no weights"
    elif case == "pickle weights":
        import torch
        from safetensors.torch import load_file

        weights = next(broken.glob("*.safetensors"))
        torch.save(load_file(weights), broken / "pytorch_model.bin")
        weights.unlink()
        pattern = "only pickle weights .*allow_pickle_weights"
    elif case == "remote code":
        cfg_json = json.loads((broken / "config.json").read_text())
        cfg_json.update(model_type="mystery_lm", auto_map={"AutoModelForCausalLM": "modeling_mystery.MysteryLM"})
        (broken / "config.json").write_text(json.dumps(cfg_json))
        pattern = "trust_remote_code"
    elif case == "no chat template":
        tok_cfg = json.loads((broken / "tokenizer_config.json").read_text())
        tok_cfg.pop("chat_template", None)
        (broken / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
        (broken / "chat_template.jinja").unlink(missing_ok=True)
        data["template"] = "tokenizer"
        pattern = "tokenizer has no chat template"
    else:
        model["lora"] = {"r": 4}
        model["quantization"] = {"bits": 8}
        pattern = "bits: 8 needs a CUDA GPU"
    cfg = config(tmp_path, model_dir, model=model, data=data)
    expect(capsys, pattern, "train", cfg)
    assert nothing_written(tmp_path)


def test_resume_and_work_dir_mistakes(capsys, tmp_path, model_dir):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(20))
    cfg = config(tmp_path, model_dir)
    expect(capsys, "holds no checkpoints", "train", cfg, "--resume")
    assert main(["train", str(cfg), "train.save_every=1", "train.max_steps=2"]) == 0
    capsys.readouterr()
    expect(capsys, "already holds a run", "train", cfg)
    expect(capsys, r"--resume cannot change the data stream or the model .*: model.lora: None -> \{'r': 4", "train", cfg,
           "--resume", "model.lora.r=4")
    expect(capsys, "is not a complete checkpoint", "train", cfg, "--resume", tmp_path / "run" / "checkpoints")


def test_parallel_mesh_mistakes(capsys, tmp_path, model_dir, monkeypatch):
    """sp x tp not dividing the world size, and SP beyond the model's heads: one line each,
    before any rank starts (NPROC_PER_NODE=8 is checked in this process, nothing is launched)."""
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    cfg = config(tmp_path, model_dir)
    expect(capsys, r"parallel.sequence_parallel \(2\) x parallel.tensor_parallel \(1\) = 2 does not divide "
                   r"the world size 1", "train", cfg, "parallel.sequence_parallel=2")
    monkeypatch.setenv("NPROC_PER_NODE", "8")
    expect(capsys, r"parallel.sequence_parallel 8 is larger than the head count allows: the model has 4 attention "
                   r"heads", "train", cfg, "parallel.sequence_parallel=8")
    expect(capsys, r"parallel.tensor_parallel 4 does not divide the model's 4 attention heads and 2 key/value heads",
           "train", cfg, "parallel.tensor_parallel=4")
    expect(capsys, "world size 8", "train", cfg, "parallel.tensor_parallel=3")
    expect(capsys, r"tensor_parallel > 1 does not work with LoRA", "train", cfg, "parallel.tensor_parallel=2",
           "model.lora.r=4")
    assert nothing_written(tmp_path)


def test_small_message_bugs(capsys, tmp_path, model_dir):
    """Each message names the right thing: chat's own --template, a model (not tokenizer) folder,
    the whole tokenizer error, plan's argument ranges."""
    no_template = tmp_path / "no_template"
    shutil.copytree(model_dir, no_template)
    tok_cfg = json.loads((no_template / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    expect(capsys, r"the tokenizer in .*no_template has no chat template \(pass --template NAME, one of: chatml",
           "chat", no_template, "--prompt", "hi")
    expect(capsys, r"--template: unknown template 'chatmll' \(did you mean 'chatml'\?\)", "chat", model_dir,
           "--template", "chatmll", "--prompt", "hi")
    expect(capsys, r"model folder not found: .*nowhere", "chat", tmp_path / "nowhere", "--prompt", "hi")
    from tuneforge.model.load import load_tokenizer
    from tuneforge.errors import UserError

    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(UserError, match=r"^model folder not found: .*nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(UserError) as info:
        load_tokenizer(no_tokenizer)
    assert "\n" not in str(info.value) and not str(info.value).rstrip().endswith("from one of:"), str(info.value)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(5))
    cfg = config(tmp_path, model_dir)
    for args, message in ((["--gpus", "-3"], "--gpus: must be at least 1, got -3"),
                          (["--gpu-memory", "nan"], "--gpu-memory: must be a finite number above 0, got nan"),
                          (["--gpu-memory", "0"], "--gpu-memory: must be a finite number above 0, got 0")):
        with pytest.raises(SystemExit) as exit_info:
            main(["plan", str(cfg), *args])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
