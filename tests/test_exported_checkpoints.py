"""What `export` and `chat` make of a run: a full fine-tune checkpoint exports with its tokenizer
(chat works on it), and an adapter meets a base it was not trained on with one line naming both."""

import json
import shutil

import pytest
from helpers import alpaca_records, make_tiny_model, write_config, write_jsonl

from tuneforge.cli import main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from helpers import build_tokenizer

    root = tmp_path_factory.mktemp("export_models")
    tok = build_tokenizer()
    make_tiny_model(root / "base", tok)
    make_tiny_model(root / "other_seed", tok, seed=1)
    wide = root / "wide"
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=len(tok))).save_pretrained(wide)
    tok.save_pretrained(wide)
    return root


def train(tmp_path, model_dir, *extra):
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(16))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       train={"max_steps": 3, "save_every": 2})
    assert main(["train", str(cfg), *extra]) == 0
    return tmp_path / "run"


def test_full_fine_tune_checkpoint_exports_with_its_tokenizer(tmp_path, models, capsys):
    run = train(tmp_path, models / "base")
    assert main(["export", str(run / "checkpoints" / "step_2"), str(tmp_path / "exported")]) == 0
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "exported" / name).is_file(), name
    capsys.readouterr()
    assert main(["chat", str(tmp_path / "exported"), "--template", "chatml", "--prompt", "hi",
                 "--max-new-tokens", "3"]) == 0


def adapter_run(tmp_path, models):
    return train(tmp_path, models / "base", "model.lora.r=4") / "final"


def test_adapter_on_a_base_of_other_shapes_is_one_line_naming_both(tmp_path, models, capsys):
    adapter = adapter_run(tmp_path, models)
    capsys.readouterr()
    for argv in (["merge", str(models / "wide"), str(adapter), str(tmp_path / "m")],
                 ["chat", str(models / "wide"), "--adapter", str(adapter), "--template", "chatml", "--prompt", "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"was trained on {models / 'base'} (llama, hidden 64" in err and f"not on {models / 'wide'} (llama, hidden 32" in err, err
    assert not (tmp_path / "m").exists()


def test_adapter_on_a_same_shaped_other_base_warns_naming_both(tmp_path, models, capsys):
    adapter = adapter_run(tmp_path, models)
    copy = tmp_path / "base_copy"
    shutil.copytree(models / "base", copy)
    capsys.readouterr()
    assert main(["merge", str(copy), str(adapter), str(tmp_path / "same")]) == 0
    assert "warning" not in capsys.readouterr().err  # the same weights elsewhere: nothing to say
    assert main(["merge", str(models / "other_seed"), str(adapter), str(tmp_path / "other")]) == 0
    err = capsys.readouterr().err
    assert f"warning: the adapter in {adapter} was trained on {models / 'base'}, and {models / 'other_seed'} holds " \
           "other weights of the same shapes" in err
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(models / "base")
