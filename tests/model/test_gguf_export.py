"""GGUF export: transformers' GGUF loader (an independent reader) reloads what we write.

Checks logits against the source model (f32 exactly; f16 / bf16 / q8_0 against the source with
its weights rounded by the same `gguf.quants` type, and loosely against the original), the
import-gguf round trip, the tokenizer and chat template, LoRA merging, RoPE scaling metadata,
and the one-line errors. llama-cpp-python is not tested: it has no prebuilt wheel here.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.model.test_export import adapter_checkpoint  # noqa: F401 - the fixture: a tiny LoRA checkpoint
from tuneforge.cli import main
from tuneforge.config import ModelConfig
from tuneforge.errors import UserError
from tuneforge.model.export import save_hf_folder
from tuneforge.model.gguf_export import _display_name, export_gguf
from tuneforge.model.gguf_import import import_gguf
from tuneforge.model.load import load_model

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (pip install 'tuneforge[gguf]')")

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+3? hello world"},
            {"role": "assistant", "content": "It is 5."}, {"role": "user", "content": "The quick brown fox?"}]


def gguf_model(path):
    """The model in a GGUF file as transformers reads it, dequantized to float32."""
    import transformers

    extra = {"quantization_config": transformers.GgufConfig(dequantize=True)} if hasattr(transformers, "GgufConfig") else {}
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **extra).eval()


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}


def field(path, key):
    value = gguf.GGUFReader(str(path)).get_field(key)
    return None if value is None else value.contents()


def rounded_like(model, path):
    """A copy of `model` whose weights went through the same quantize/dequantize as the file's tensors."""
    types = tensor_types(path)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.dim() == 2:  # matrices: the GGUF type of the matching tensor (q/k permutation is per row)
                qtype = gguf.GGMLQuantizationType[types[_gguf_name(name)]]
                data = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(data.reshape(param.shape)))
    return rounded


def _gguf_name(name):
    from tuneforge.model.gguf_export import gguf_tensor_name

    return gguf_tensor_name(name)


def test_f32_reloads_with_the_same_logits(tiny_model_dir, tmp_path, sample_ids, logits_of):
    out = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quant="f32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]  # no temp file or scratch folder left
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    reloaded = gguf_model(out)
    assert (logits_of(reloaded, sample_ids) - logits_of(source, sample_ids)).abs().max() <= 1e-4
    assert set(tensor_types(out).values()) == {"F32"}
    assert field(out, "general.architecture") == "llama"
    assert field(out, "llama.context_length") == source.config.max_position_embeddings
    assert field(out, "llama.rope.freq_base") == pytest.approx(source.config.rope_parameters["rope_theta"])
    assert field(out, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(source.config.rms_norm_eps)
    assert field(out, "llama.attention.head_count_kv") == 2


@pytest.mark.parametrize("quant, loose", [("f16", 0.02), ("bf16", 0.1), ("q8_0", 0.2)])
def test_quantized_logits(tiny_model_dir, tmp_path, sample_ids, logits_of, quant, loose):
    out = export_gguf(tiny_model_dir, tmp_path / f"tiny-{quant}.gguf", quant=quant)
    types = tensor_types(out)
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"  # norms stay F32
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == types["output.weight"] == quant.upper()
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    got = logits_of(gguf_model(out), sample_ids)
    # exact up to float32 noise against the source with the same rounding ...
    torch.testing.assert_close(got, logits_of(rounded_like(source, out), sample_ids), rtol=0, atol=1e-4)
    # ... and the stated tolerance against the unrounded source (logits here reach about +-4)
    difference = (got - logits_of(source, sample_ids)).abs().max()
    assert 0 < difference <= loose


def test_import_gguf_round_trip_gives_the_same_weights(tiny_model_dir, tmp_path):
    export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quant="f32")
    folder = import_gguf(tmp_path / "tiny.gguf", tmp_path / "back")
    original, back = load_file(tiny_model_dir / "model.safetensors"), load_file(folder / "model.safetensors")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert torch.equal(back[name], tensor), name


def test_tokenizer_and_chat_template_round_trip(tiny_model_dir, tiny_tokenizer, tmp_path):
    out = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quant="q8_0")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    ids = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == ids
    assert loaded(ids)["input_ids"] == tiny_tokenizer(ids)["input_ids"]
    assert (loaded.eos_token, loaded.bos_token) == ("<|im_end|>", "<|endoftext|>")
    assert field(out, "tokenizer.ggml.model") == "gpt2" and field(out, "tokenizer.ggml.pre") == "gpt-2"
    assert field(out, "tokenizer.ggml.add_bos_token") is False
    types = field(out, "tokenizer.ggml.token_type")
    assert types[tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tiny_tokenizer.convert_tokens_to_ids("hello")] == gguf.TokenType.NORMAL


def test_checkpoint_chat_template_wins(tiny_model_dir, tmp_path):
    final = tmp_path / "run" / "final"
    final.parent.mkdir()
    shutil.copytree(tiny_model_dir, final)
    (final / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    out = export_gguf(final, tmp_path / "t.gguf", quant="f16")
    assert field(out, "tokenizer.chat_template") == "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    assert field(out, "general.name") == "run"


@pytest.mark.parametrize("path, name", [("runs/gsm8k/final", "gsm8k"), ("runs/gsm8k/checkpoints/step_40", "gsm8k-step_40"),
                                        ("models/smollm2-135m", "smollm2-135m")])
def test_general_name_names_the_run(tmp_path, path, name):
    assert _display_name(tmp_path / path) == name


def test_tied_embeddings_write_no_output_tensor(tiny_model, tiny_tokenizer, tmp_path, sample_ids, logits_of):
    model = tiny_model(len(tiny_tokenizer), tie=True)
    save_hf_folder(model, tiny_tokenizer, tmp_path / "tied")
    out = export_gguf(tmp_path / "tied", tmp_path / "tied.gguf", quant="f32")
    assert "output.weight" not in tensor_types(out)
    assert (logits_of(gguf_model(out), sample_ids) - logits_of(model, sample_ids)).abs().max() <= 1e-4


def _qwen(tiny_tokenizer, version):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    shape = dict(intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 vocab_size=len(tiny_tokenizer), max_position_embeddings=128, initializer_range=0.1)
    torch.manual_seed(0)
    if version == 2:  # q/k/v biases
        return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, tie_word_embeddings=False, **shape)).eval()
    # transformers' GGUF reader leaves Qwen3's head_dim at its default, 128: use that width
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=256, head_dim=128, tie_word_embeddings=False, **shape)).eval()


@pytest.mark.parametrize("version", [2, 3])
def test_qwen(tiny_tokenizer, tmp_path, sample_ids, logits_of, version):
    model = _qwen(tiny_tokenizer, version)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "_norm" in name:  # make biases and q/k norms matter
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    save_hf_folder(model, tiny_tokenizer, tmp_path / "qwen")
    out = export_gguf(tmp_path / "qwen", tmp_path / "qwen.gguf", quant="f32")
    assert field(out, "general.architecture") == f"qwen{version}"
    names = set(tensor_types(out))
    assert ("blk.0.attn_q.bias" in names) if version == 2 else ("blk.0.attn_k_norm.weight" in names)
    assert (logits_of(gguf_model(out), sample_ids) - logits_of(model, sample_ids)).abs().max() <= 1e-4


def test_lora_is_merged_first(adapter_checkpoint, tiny_model_dir, tmp_path, sample_ids, logits_of):
    ckpt, peft_model = adapter_checkpoint
    with pytest.raises(UserError, match="is a LoRA adapter; a GGUF file holds a whole model.*--merge-lora"):
        export_gguf(ckpt, tmp_path / "out" / "lora.gguf")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    out = export_gguf(ckpt, tmp_path / "out" / "lora.gguf", quant="f32", merge_lora=True)
    assert [p.name for p in out.parent.iterdir()] == ["lora.gguf"]  # the merged scratch folder is gone
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    merged_logits = logits_of(gguf_model(out), sample_ids)
    assert (merged_logits - logits_of(peft_model, sample_ids)).abs().max() <= 1e-4
    assert (merged_logits - logits_of(base, sample_ids)).abs().max() > 1e-2  # the adapter did change something


def test_llama3_rope_scaling(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=len(tiny_tokenizer), max_position_embeddings=128,
                         rope_parameters=rope)
    model = LlamaForCausalLM(config).eval()
    save_hf_folder(model, tiny_tokenizer, tmp_path / "l3")
    out = export_gguf(tmp_path / "l3", tmp_path / "l3.gguf", quant="f32")
    freqs = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "rope_freqs.weight").data.copy()
    default = 1.0 / (500000.0 ** (torch.arange(0, 32, 2, dtype=torch.float64) / 32))
    # llama.cpp divides each frequency by its factor: that must give transformers' scaled ones (1x .. 8x)
    torch.testing.assert_close(default / torch.from_numpy(freqs).double(), model.model.rotary_emb.inv_freq.double(),
                               rtol=1e-6, atol=0)
    assert freqs.min() == pytest.approx(1.0) and freqs.max() == pytest.approx(8.0)


def test_linear_rope_scaling_metadata(tiny_tokenizer, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=len(tiny_tokenizer), max_position_embeddings=128,
                         rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})
    save_hf_folder(LlamaForCausalLM(config), tiny_tokenizer, tmp_path / "lin")
    out = export_gguf(tmp_path / "lin", tmp_path / "lin.gguf", quant="f16")
    assert field(out, "llama.rope.scaling.type") == "linear"
    assert field(out, "llama.rope.scaling.factor") == pytest.approx(4.0)


def test_existing_file_is_kept_unless_force(tiny_model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UserError, match="m.gguf already exists.*--force"):
        export_gguf(tiny_model_dir, out)
    assert out.read_bytes() == b"keep me"
    export_gguf(tiny_model_dir, out, quant="q8_0", force=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_unsupported_architecture_leaves_nothing(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(tmp_path / "g")
    tiny_tokenizer.save_pretrained(tmp_path / "g")
    with pytest.raises(UserError, match="cannot export a 'gpt2' model to GGUF.*supported: llama"):
        export_gguf(tmp_path / "g", tmp_path / "out" / "g.gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_one_line_errors_and_success(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf", "--quant", "q4_k"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown GGUF quantization 'q4_k'" in err and "f32, f16, bf16, q8_0" in err
    assert main(["export", str(tiny_model_dir), str(tmp_path / "m.bin"), "--format", "gguf"]) == 2
    assert "must be a file ending in .gguf" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dir), str(out), "--format", "gguf", "--quant", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out} (") and "q8_0" in printed
    assert field(out, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert main(["export", str(tiny_model_dir), str(out)]) == 2  # the .gguf suffix picks the format
    assert "already exists" in capsys.readouterr().err
    assert main(["export", str(tiny_model_dir), str(tmp_path / "hf"), "--quant", "q8_0"]) == 2
    assert "--quant is for GGUF files" in capsys.readouterr().err and not (tmp_path / "hf").exists()


def test_mistral_is_written_as_llama(tiny_tokenizer, tmp_path, sample_ids, logits_of):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.1,
                                             vocab_size=len(tiny_tokenizer), max_position_embeddings=128)).eval()
    # (a general.name with "mistral" in it sends transformers' GGUF reader down a path gguf 0.19 lacks)
    save_hf_folder(model, tiny_tokenizer, tmp_path / "tiny-m")
    out = export_gguf(tmp_path / "tiny-m", tmp_path / "m.gguf", quant="f32")
    assert field(out, "general.architecture") == "llama"
    assert (logits_of(gguf_model(out), sample_ids) - logits_of(model, sample_ids)).abs().max() <= 1e-4


def sentencepiece_folder(folder: Path, keep_model_file: bool) -> Path:
    """A tiny Llama with a SentencePiece BPE tokenizer (byte fallback, ChatML pieces) trained here."""
    import io

    import sentencepiece
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.model.conftest import CHAT_TEMPLATE, CORPUS

    buffer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=400, model_type="bpe", byte_fallback=True,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    source = folder.parent / f"{folder.name}-sp"
    source.mkdir(parents=True)
    (source / "tokenizer.model").write_bytes(buffer.getvalue())
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, vocab_size=len(tokenizer), initializer_range=0.1))
    save_hf_folder(model, tokenizer, folder)
    if keep_model_file:
        shutil.copy(source / "tokenizer.model", folder / "tokenizer.model")
    return folder


@pytest.mark.parametrize("keep_model_file", [False, True], ids=["scores-from-merges", "scores-from-tokenizer.model"])
def test_sentencepiece_vocabulary(tmp_path, keep_model_file, logits_of):
    import sentencepiece

    folder = sentencepiece_folder(tmp_path / "sp", keep_model_file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    out = export_gguf(folder, tmp_path / "sp.gguf", quant="f32")
    assert field(out, "tokenizer.ggml.model") == "llama"
    # transformers 5 prefixes "▁" to the start of the text only, not after special tokens: llama.cpp cannot
    # do that, so the prefix is off and chat prompts (which start with a special token) match exactly
    assert field(out, "tokenizer.ggml.add_space_prefix") is False
    adds_bos = tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    assert field(out, "tokenizer.ggml.add_bos_token") is adds_bos
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=out.name)
    prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert loaded.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == prompt
    ids = tokenizer(prompt)["input_ids"]
    assert loaded(prompt)["input_ids"] == ids
    for text in ("hello world", "Fine-tuning 2+3 = 5?", "naïve ☃ unseen bytes"):
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
    types = field(out, "tokenizer.ggml.token_type")
    assert types[tokenizer.convert_tokens_to_ids("<0x0A>")] == gguf.TokenType.BYTE
    assert types[tokenizer.unk_token_id] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    scores = field(out, "tokenizer.ggml.scores")
    if keep_model_file:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        assert scores == pytest.approx([processor.GetScore(i) for i in range(processor.vocab_size())])
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tensor = torch.tensor([ids])
    assert (logits_of(gguf_model(out), tensor) - logits_of(model, tensor)).abs().max() <= 1e-4


@pytest.mark.parametrize("bias", [False, True])
def test_internlm2_is_written_in_its_llama_layout(tmp_path, tiny_tokenizer, logits_of, sample_ids, bias):
    from tests.model.test_internlm2 import internlm2_config, internlm2_state, write_internlm2
    from tuneforge.model.gguf_export import rotary_permute

    cfg = internlm2_config(vocab_size=len(tiny_tokenizer), bias=bias)
    folder = write_internlm2(tmp_path / "internlm2", cfg, internlm2_state(cfg))
    tiny_tokenizer.save_pretrained(folder)
    out = export_gguf(folder, tmp_path / "internlm2.gguf", quant="f32")
    assert field(out, "general.architecture") == "llama"
    model = load_model(ModelConfig(path=str(folder), dtype="float32")).eval()  # InternLM2 converted on load
    if not bias:
        assert (logits_of(gguf_model(out), sample_ids) - logits_of(model, sample_ids)).abs().max() <= 1e-4
        return
    # transformers' GGUF reader drops attention biases (its Llama config has none); llama.cpp reads them
    stored = {t.name: torch.from_numpy(t.data.copy()) for t in gguf.GGUFReader(str(out)).tensors}
    attention = model.model.layers[1].self_attn
    torch.testing.assert_close(stored["blk.1.attn_q.bias"], rotary_permute(attention.q_proj.bias.detach(), 4), rtol=0, atol=0)
    torch.testing.assert_close(stored["blk.1.attn_k.bias"], rotary_permute(attention.k_proj.bias.detach(), 2), rtol=0, atol=0)
    torch.testing.assert_close(stored["blk.1.attn_output.bias"], attention.o_proj.bias.detach(), rtol=0, atol=0)


def llama_cpp():
    """llama.cpp itself, through llama-cpp-py-sync's prebuilt library, or a skip saying why not."""
    try:
        import llama_cpp_py_sync
        from llama_cpp_py_sync._cffi_bindings import get_lib

        get_lib()  # the import alone does not load the library
    except (ImportError, OSError, RuntimeError) as exc:
        pytest.skip(f"llama.cpp is not available (pip install llama-cpp-py-sync; its wheels need glibc >= 2.38): {exc}"[:300])
    return llama_cpp_py_sync


def llama_cpp_logits(model, ids: list[int]):
    """Logits llama.cpp computes at every position, feeding `ids` one at a time."""
    import numpy as np

    model._clear_context_state()
    rows, past = [], 0
    for token in ids:
        past = model._eval_tokens([token], past)
        row = model._lib.llama_get_logits_ith(model._ctx, -1)
        rows.append(np.frombuffer(model._ffi.buffer(row, 4 * model.n_vocab), dtype=np.float32).copy())
    return torch.from_numpy(np.stack(rows))


@pytest.mark.parametrize("quant, tolerance", [("f32", 1e-2), ("q8_0", 0.3)])
def test_llama_cpp_reads_the_file_as_training_did(tiny_model_dir, tiny_tokenizer, tmp_path, quant, tolerance):
    lib = llama_cpp()
    out = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", quant=quant)
    source = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompt = tiny_tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    ids = tiny_tokenizer(prompt)["input_ids"]
    model = lib.Llama(str(out), n_ctx=256, n_threads=1, verbose=False)
    try:
        assert model._format_chat_prompt(MESSAGES)[0] == prompt  # llama.cpp applies the template it carries
        assert model.tokenize(prompt, add_special=True, parse_special=True) == ids
        with torch.no_grad():
            expected = source(input_ids=torch.tensor([ids])).logits[0]
        # llama.cpp keeps its KV cache in f16, hence a tolerance even at f32 (measured 2e-3 on logits up to 3.5)
        assert (llama_cpp_logits(model, ids) - expected).abs().max() <= tolerance
        if quant == "f32":  # greedy continuation, token by token
            greedy = source.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
            assert llama_cpp_logits(model, ids + greedy[:-1])[len(ids) - 1:].argmax(-1).tolist() == greedy
    finally:
        model.close()


SMOLLM2_DIR = os.environ.get("TUNEFORGE_SMOLLM2_DIR", "")


@pytest.mark.skipif(not Path(SMOLLM2_DIR, "config.json").is_file(),
                    reason="slow (~2 min): set TUNEFORGE_SMOLLM2_DIR to the SmolLM2-135M-Instruct HF folder")
@pytest.mark.parametrize("quant, tolerance", [("f16", 0.1), ("q8_0", 2.0)])
def test_real_smollm2(tmp_path, quant, tolerance):
    """The figures of docs/export.md: size, and transformers' reload against the source (logits up to ~38)."""
    out = export_gguf(SMOLLM2_DIR, tmp_path / f"smollm2-{quant}.gguf", quant=quant)
    print(f"{out.name}: {out.stat().st_size:,} bytes")
    assert field(out, "tokenizer.ggml.pre") == "smollm"  # llama.cpp's own name for this tokenizer
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_DIR)
    source = AutoModelForCausalLM.from_pretrained(SMOLLM2_DIR, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    reloaded = gguf_model(out)
    with torch.no_grad():
        difference = (reloaded(input_ids=ids).logits - source(input_ids=ids).logits).abs().max().item()
        answer = reloaded.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
    print(f"max |logit difference| {difference:.4f}")
    assert difference <= tolerance
    assert "Paris" in tokenizer.decode(answer)


def test_not_a_checkpoint_is_one_line_and_leaves_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a checkpoint"):
        export_gguf(tmp_path / "empty", tmp_path / "out" / "x.gguf")
    assert list((tmp_path / "out").iterdir()) == []  # no scratch folder, no temp file
