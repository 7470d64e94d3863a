"""`model.compile: auto`: compiles exactly where it is measured to pay (SFT, one fp32 CPU process,
no quantization or checkpointing, >= 50M decoder matmul parameters, a C++ compiler), and the
planner's memory estimate follows the same choice."""

import pytest

from tuneforge.config import Config
from tuneforge.model import compile as compile_mod
from tuneforge.model.compile import AUTO_MIN_MATMUL_PARAMS, compile_choice

BIG = AUTO_MIN_MATMUL_PARAMS


def config(model=None, train=None) -> Config:
    train = train or {}
    dataset = {"path": "d.jsonl", "format": "preference" if train.get("objective") else "alpaca"}
    return Config.model_validate({"model": {"path": "m", **(model or {})}, "data": {"datasets": [dataset]},
                                  "train": train})


@pytest.fixture
def compiler(monkeypatch):
    monkeypatch.setattr(compile_mod, "has_cxx_compiler", lambda: True)


def test_auto_is_the_default_and_compiles_a_large_sft_run_on_one_cpu(compiler):
    assert config().model.compile == "auto"
    assert compile_choice(config(), "cpu", 1, BIG) == (True, None)
    assert compile_choice(config(model={"lora": {"r": 8}}), "cpu", 1, 135_000_000) == (True, None)


@pytest.mark.parametrize("case,args,reason", [
    ("gpu", ({}, {}, "cuda", 1, BIG), "CPU only"),
    ("ranks", ({}, {}, "cpu", 2, BIG), "single-process"),
    ("dpo", ({}, {"objective": "dpo"}, "cpu", 1, BIG), "SFT only, not dpo"),
    ("qlora", ({"lora": {"r": 8}, "quantization": {"bits": 4}}, {}, "cpu", 1, BIG), "quantized"),
    ("mixed", ({"cpu_mixed_precision": True}, {}, "cpu", 1, BIG), "cpu_mixed_precision"),
    ("checkpointing", ({"gradient_checkpointing": True}, {}, "cpu", 1, BIG), "gradient checkpointing"),
    ("small", ({}, {}, "cpu", 1, BIG - 1), "too small"),
])
def test_auto_stays_eager_elsewhere_and_says_why(compiler, case, args, reason):
    model, train, device, world, params = args
    compiles, why = compile_choice(config(model, train), device, world, params)
    assert not compiles and reason in why


def test_auto_without_a_cxx_compiler_stays_eager(monkeypatch):
    monkeypatch.setattr(compile_mod, "has_cxx_compiler", lambda: False)
    compiles, why = compile_choice(config(), "cpu", 1, BIG)
    assert not compiles and "no C++ compiler" in why


@pytest.mark.parametrize("setting", [True, False])
def test_an_explicit_setting_is_obeyed_everywhere(setting):
    for device, world, params in (("cpu", 1, 1), ("cuda", 8, BIG), ("cpu", 1, BIG)):
        assert compile_choice(config({"compile": setting}), device, world, params) == (setting, None)


def test_plan_estimates_the_compiled_run_when_auto_compiles(tmp_path, compiler):
    import json

    from tuneforge.plan import estimate, model_shape, setup_from_config

    (tmp_path / "config.json").write_text(json.dumps({  # SmolLM2-135M's shape: 106M decoder matmul parameters
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}))
    lora = {"path": str(tmp_path), "lora": {"r": 16}}
    auto, eager = (setup_from_config(config({**lora, **extra}), None, None) for extra in ({}, {"compile": False}))
    assert auto.compiled and not auto.heap_trim
    assert not eager.compiled and eager.heap_trim
    shape = model_shape(str(tmp_path))
    assert estimate(shape, auto)["activations"] < estimate(shape, eager)["activations"]


def test_auto_tries_the_compiler_before_training_and_stays_eager_if_it_fails(compiler, monkeypatch):
    calls = []
    monkeypatch.setattr(compile_mod, "cpu_compile_error", lambda: calls.append(1) or "torch.compile failed here (x)")
    assert compile_choice(config(), "cpu", 1, BIG, try_compiler=True) == (False, "torch.compile failed here (x)")
    assert compile_choice(config(), "cpu", 1, BIG) == (True, None) and len(calls) == 1  # the planner does not try
    assert compile_choice(config({"compile": True}), "cpu", 1, BIG, try_compiler=True) == (True, None)
    assert compile_choice(config(), "cpu", 1, BIG - 1, try_compiler=True)[0] is False and len(calls) == 1


def test_the_compiler_probe_builds_a_kernel_here():
    """The suite's machines have a working toolchain (the compiled-blocks test needs it too)."""
    assert compile_mod.cpu_compile_error() is None
