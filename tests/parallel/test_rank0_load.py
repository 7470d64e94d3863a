"""FSDP loads the weights on rank 0 only: the other ranks build the model on the meta device
and receive their shards (`tuneforge.parallel.rank0_load`), on the CPU over gloo with 2 ranks.

One torchrun launch (`rank0_load_worker.py`) loads and shards, as the training loop does, a
tiny model with tied embeddings and odd sizes (uneven shards; CPU offload), the same with LoRA,
and a 59M-parameter model (stored in bf16, loaded in fp32 as full fine-tuning does: 236 MB of
fp32 weights); then each rank reports. That every strategy still trains exactly like one
process is test_strategies.py's job (its FSDP runs take this path).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import alpaca_records, build_tokenizer, write_config, write_jsonl
from jobs import torchrun

WORKER = Path(__file__).with_name("rank0_load_worker.py")
LORA = {"r": 3, "alpha": 8, "dropout": 0.0}


def make_llama(path: Path, tokenizer, dtype="float32", **dims) -> int:
    """A random Llama saved in `dtype` with the tokenizer; returns its fp32 size in bytes."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **dims)
    model = LlamaForCausalLM(cfg)
    size = sum(p.numel() for p in model.parameters()) * 4
    model.to(getattr(torch, dtype)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return size


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("rank0_load")
    tokenizer = build_tokenizer()
    tiny = root / "tiny"  # odd sizes (vocab, kv projections, LoRA rank 3): the last rank's shards are shorter
    make_llama(tiny, tokenizer, hidden_size=40, intermediate_size=90, num_hidden_layers=2, num_attention_heads=5,
               num_key_value_heads=1, vocab_size=len(tokenizer) + 3, tie_word_embeddings=True)
    model_bytes = make_llama(root / "medium", tokenizer, "bfloat16", hidden_size=512, intermediate_size=2048,
                             num_hidden_layers=14, num_attention_heads=8, num_key_value_heads=8,
                             vocab_size=len(tokenizer))  # 59M parameters
    data = write_jsonl(root / "train.jsonl", alpaca_records(4))
    datasets = [{"path": str(data), "format": "alpaca"}]
    configs = [  # the medium model last: imports and first-use allocations are done by then
        write_config(root / "tiny.yaml", tiny, datasets, parallel={"strategy": "fsdp", "zero": 3, "offload": True}),
        write_config(root / "tiny_lora.yaml", tiny, datasets, parallel={"strategy": "fsdp", "zero": 3},
                     model={"lora": LORA}),
        write_config(root / "medium.yaml", root / "medium", datasets, parallel={"strategy": "fsdp", "zero": 2}),
    ]
    out = root / "reports"
    torchrun([str(out), *map(str, configs)], timeout=300, worker=WORKER)
    found = {path.name.removesuffix(".json"): json.loads(path.read_text()) for path in out.glob("*.json")}
    return {"model_mb": model_bytes / 2**20, **found}


@pytest.mark.parametrize("name", ["tiny", "tiny_lora", "medium"])
def test_rank0_loads_and_the_other_ranks_build_on_meta(reports, name):
    rank0, rank1 = reports[f"{name}.rank0"], reports[f"{name}.rank1"]
    assert rank0["load_device"] == "cpu" and not rank0["any_meta"]
    assert rank1["load_device"] == "meta" and rank1["all_meta"]  # LoRA adapters included


@pytest.mark.parametrize("name", ["tiny", "tiny_lora", "medium"])
def test_every_shard_and_buffer_is_rank0s(reports, name):
    """The gathered model equals the weights on disk (LoRA: rank 0's initial adapter, which
    the meta rank never drew), and rank 1's buffers, the non-persistent rotary `inv_freq`
    that no state dict carries included, equal rank 0's."""
    rank0 = reports[f"{name}.rank0"]
    assert rank0["weights_checked"] == {"tiny": 20, "tiny_lora": 28, "medium": 129}[name]
    assert rank0["weights_max_diff"] == 0.0
    assert any(b.endswith("rotary_emb.inv_freq") for b in rank0["buffers"])
    assert rank0["buffers_max_diff"] == 0.0


@pytest.mark.parametrize("name", ["tiny", "tiny_lora", "medium"])
def test_the_sharded_model_computes_what_rank0_loaded(reports, name):
    """Loss and gradient norm of one row, sharded (after FSDP's lazy init) and on a plain model."""
    rank0, rank1 = reports[f"{name}.rank0"], reports[f"{name}.rank1"]
    assert rank0["loss"] == rank1["loss"] == pytest.approx(rank0["reference_loss"], abs=1e-5)
    assert rank0["grad_norm"] == rank1["grad_norm"] == pytest.approx(rank0["reference_grad_norm"], rel=1e-4)


def test_tied_embeddings_stay_tied(reports):
    assert reports["tiny.rank0"]["tied"] and reports["tiny.rank1"]["tied"]


def test_only_rank0_holds_the_full_model(reports):
    """Memory growth from loading to sharded: rank 0 has the whole fp32 model at some point,
    rank 1 only its half of the shards (plus one parameter in flight)."""
    model_mb = reports["model_mb"]
    grown = [reports[f"medium.rank{r}"]["peak_mb"] - reports[f"medium.rank{r}"]["rss_before_mb"] for r in (0, 1)]
    assert grown[0] >= 0.9 * model_mb, (grown, model_mb)
    # measured: rank 0 +339 MB, rank 1 +120-165 MB for 236 MB; every rank loading the model: +339 each
    assert grown[1] <= 0.9 * model_mb, (grown, model_mb)
    assert grown[1] <= 0.7 * grown[0], (grown, model_mb)
