"""One rule for paths: written in a config file, relative to the file (train.work_dir too);
given on the command line, relative to the working directory. Shipped recipes still find
their data after `copy-config`."""

import pytest
import yaml
from helpers import make_tiny_model

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.recipes import recipe_names, recipe_path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers import build_tokenizer

    return make_tiny_model(tmp_path_factory.mktemp("paths_model"), build_tokenizer())


def test_every_path_in_a_file_is_relative_to_the_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    cfg = tmp_path / "project" / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"path": "m"}, "data": {"datasets": [{"path": "d.jsonl"}], "cache_dir": "c"},
                                   "train": {"work_dir": "runs/x"}}))
    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_config(cfg)
    base = tmp_path / "project"
    assert (loaded.model.path, loaded.data.datasets[0].path, loaded.data.cache_dir, loaded.train.work_dir) == (
        str(base / "m"), str(base / "d.jsonl"), str(base / "c"), str(base / "runs" / "x"))
    overridden = load_config(cfg, ["train.work_dir=here", "model.path=m2"])
    assert overridden.train.work_dir == str(tmp_path / "elsewhere" / "here")
    assert overridden.model.path == str(tmp_path / "elsewhere" / "m2")
    assert main(["train", str(cfg), "--print-config", "--work-dir", "cli_run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["work_dir"] == str(tmp_path / "elsewhere" / "cli_run")


@pytest.mark.parametrize("name", recipe_names())
def test_copied_recipes_read_the_same_data(tmp_path, name):
    assert main(["copy-config", name, str(tmp_path)]) == 0
    copied, original = load_config(tmp_path / f"{name}.yaml"), load_config(recipe_path(name))
    for a, b in zip(copied.data.datasets, original.data.datasets):
        from pathlib import Path

        assert a.path == b.path or not Path(b.path).exists()  # shipped data: the same file; placeholders: not rewritten
    assert copied.train.work_dir == str(tmp_path / Path(original.train.work_dir).relative_to(recipe_path(name).parent))
    text = (tmp_path / f"{name}.yaml").read_text()
    assert text.splitlines()[0] == recipe_path(name).read_text().splitlines()[0]  # comments kept


def test_copy_config_then_train(tmp_path, model_dir, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert main(["copy-config", "tiny_cpu_example", "mine.yaml"]) == 0
    code = main(["train", "mine.yaml", f"model.path={model_dir}", "train.max_steps=1", "data.max_length=256",
                 f"data.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert (tmp_path / "work" / "runs" / "tiny_cpu_example" / "final").is_dir()
    assert "500 samples read" in err
