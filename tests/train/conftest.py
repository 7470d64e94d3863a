"""Fixtures for training tests: a tiny Llama model folder with the tiny ChatML tokenizer."""

import pytest
from helpers import alpaca_records, make_tiny_model, write_config, write_jsonl


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_model"), tokenizer)


@pytest.fixture
def run_config(tmp_path, tiny_model_dir):
    """A factory: run_config(name, **sections) -> path of a YAML config for a tiny run."""
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_records(120))

    def make(name="run", data_path=data, **sections):
        base = {"train": {"lr": 1e-3, "warmup_ratio": 0.1, "seed": 3, "work_dir": str(tmp_path / name)},
                "model": {"path": str(tiny_model_dir), "dtype": "float32"},
                "data": {"max_length": 96}}
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        return write_config(tmp_path / f"{name}.yaml", tiny_model_dir, [{"path": str(data_path), "format": "alpaca"}],
                            **base)

    return make
