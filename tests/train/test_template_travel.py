"""The template a run trains with travels with its outputs, and chat/eval prompt with it by default."""

import json

import pytest

from tuneforge.cli import main
from tuneforge.data.records import Message, Sample
from tuneforge.data.template_jinja import to_jinja
from tuneforge.data.templates import NAMED_TEMPLATES, get_template
from tuneforge.data.tokenize import encode_samples
from tuneforge.generate import prompt_ids, prompt_text
from tuneforge.model.load import load_tokenizer
from tuneforge.model.source import resolve_source

TEMPLATES = ["tokenizer", *sorted(NAMED_TEMPLATES)]


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from tuneforge.config import ModelConfig
    from tuneforge.model.load import load_model

    return load_model(ModelConfig(path=str(tiny_model_dir), dtype="float32"))


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_prompt_ids_equal_training_ids(name, tiny_model, tiny_model_dir, tmp_path):
    from tuneforge.train.checkpoint import save_final_model

    training_tokenizer = load_tokenizer(tiny_model_dir)
    final = save_final_model(tmp_path / "final", tiny_model, training_tokenizer, template=name)
    source = resolve_source(final)  # what `chat` and `eval` do without --template
    assert source.template == name
    chat_tokenizer = load_tokenizer(source.tokenizer)
    for system in ([], [Message("system", "Answer briefly.")]):
        question = system + [Message("user", "What is two plus three?")]
        trained = encode_samples([Sample(messages=question + [Message("assistant", "five #### 5")])],
                                 get_template(name, training_tokenizer), training_tokenizer, 256, "right")
        prompt = prompt_ids(chat_tokenizer, source.template, question)
        assert trained.tokens[: len(prompt)].tolist() == prompt
        assert int(trained.trained.argmax()) == len(prompt)  # the answer is what comes next
        # the saved Jinja (what HF, llama.cpp and Ollama use) renders the same prompt
        rows = [{"role": m.role, "content": m.content} for m in question]
        text = chat_tokenizer.apply_chat_template(rows, tokenize=False, add_generation_prompt=True)
        assert text == prompt_text(training_tokenizer, name, question)
    if name != "tokenizer":
        assert (final / "chat_template.jinja").read_text() == to_jinja(NAMED_TEMPLATES[name])


def test_run_outputs_carry_the_template(run_config, tmp_path, tiny_model_dir, capsys):
    from tuneforge.chat import load_for_chat

    cfg = run_config("tmpl", data={"template": "llama3_chat"}, train={"max_steps": 2, "save_every": 1},
                     model={"lora": {"r": 2, "alpha": 4, "dropout": 0.0}})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "tmpl"
    jinja = to_jinja(NAMED_TEMPLATES["llama3_chat"])
    merged, exported = tmp_path / "merged", tmp_path / "exported"
    assert main(["merge", str(tiny_model_dir), str(run / "final"), str(merged)]) == 0
    assert main(["export", str(run / "checkpoints" / "step_1"), str(exported), "--merge-lora"]) == 0
    for folder in (run / "final", run / "checkpoints" / "step_1" / "model", merged, exported):
        assert json.loads((folder / "tuneforge.json").read_text())["template"] == "llama3_chat", folder
        assert (folder / "chat_template.jinja").read_text() == jinja, folder
    _, _, template = load_for_chat(str(run), None)  # a run dir: its final/ adapter on its base
    assert template == "llama3_chat"
    assert load_for_chat(str(merged), None)[2] == "llama3_chat"
    assert load_for_chat(str(run), None, "chatml")[2] == "chatml"  # --template still wins
    capsys.readouterr()
    assert main(["chat", str(run), "--prompt", "the fox", "--max-new-tokens", "3"]) == 0
