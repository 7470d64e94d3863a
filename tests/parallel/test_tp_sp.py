"""Tensor parallel and Ulysses sequence parallel against one process, on the CPU over gloo, fp32.

Two ranks with the same global batch as one process (micro 2 x accumulation 2 on one data-parallel
replica): TP=2 (a dp 1 x tp 2 mesh, FSDP2 over dp) and SP=2 (dp 1 x sp 2) must reproduce the
single-process losses (|d| <= 1e-5), grad norms, eval losses and final weights (relative <= 1e-4),
with gradient clipping active. The data are packed rows of several documents whose widths are
not multiples of 2, so SP pads, splits documents across ranks and keeps their boundaries. A
second SP run uses a model with one key/value head, which the Ulysses attention must repeat.
A TP run resumed from its sharded step-2 checkpoint equals the uninterrupted one bit for bit,
and its checkpoint exports to a plain transformers folder.

One torchrun launch (the generic `strategy_worker.py`) trains the three variants; a 4-rank
launch mixes the dims (dp 2 x sp 2, dp 2 x tp 2, sp 2 x tp 2); the resume is one CLI launch.
Mesh mistakes are one-line errors, checked without starting ranks.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import alpaca_records, build_tokenizer, losses, make_tiny_model, write_jsonl
from jobs import (
    assert_matches_single, child_env, metric_rows, one_thread, run_config, shared_runs, torchrun,
    weight_errors, weights,
)
from tuneforge.cli import main

# name -> (parallel section, model, single-process reference)
VARIANTS = {
    "tp2": ({"strategy": "fsdp", "tensor_parallel": 2}, "model", "single"),
    "sp2": ({"strategy": "auto", "sequence_parallel": 2}, "model", "single"),
    "sp2_mqa": ({"strategy": "fsdp", "zero": 2, "sequence_parallel": 2}, "model_mqa", "single_mqa"),
}
# --------------------------------------------------------------------------- the shared runs


def _build(root: Path) -> None:
    tokenizer = build_tokenizer()
    models = {"model": make_tiny_model(root / "model", tokenizer, tie=True),
              "model_mqa": make_tiny_model(root / "model_mqa", tokenizer, tie=True, kv_heads=1)}
    data = write_jsonl(root / "train.jsonl", alpaca_records(64))

    def config(name, model, parallel=None):  # packed rows of several documents; no dp, so the same micro-batch
        sections = {"data": {"packing": "soft"}, **({"parallel": parallel} if parallel else {})}
        return run_config(root, name, models[model], data, sections)

    with one_thread():
        for name in ("single", "single_mqa"):
            assert main(["train", str(config(name, "model" if name == "single" else "model_mqa"))]) == 0, name
    torchrun([str(config(name, model, parallel)) for name, (parallel, model, _) in VARIANTS.items()])


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """The folder holding every run (built once per test session, also under pytest-xdist)."""
    return shared_runs(tmp_path_factory, "tp-sp", _build)


# --------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", list(VARIANTS))
def test_two_ranks_match_one_process(runs, name):
    assert_matches_single(runs / name, runs / VARIANTS[name][2])


def test_four_ranks_mix_data_sequence_and_tensor_parallel(runs, tmp_path):
    """4 ranks, one launch: dp 2 x sp 2 (FSDP sums over sp, averages over dp), dp 2 x tp 2 and
    sp 2 x tp 2, each with the single run's global batch (micro 1 per replica when dp is 2)."""
    import yaml

    base = yaml.safe_load((runs / "tp2.yaml").read_text())
    meshes = {"dp2_sp2": ({"sequence_parallel": 2}, 1), "dp2_tp2": ({"tensor_parallel": 2}, 1),
              "sp2_tp2": ({"sequence_parallel": 2, "tensor_parallel": 2}, 2)}
    configs = []
    for name, (parallel, micro) in meshes.items():
        tree = {**base, "parallel": {"strategy": "fsdp", **parallel},
                "train": {**base["train"], "micro_batch_size": micro, "work_dir": str(tmp_path / name), "save_every": 0}}
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(yaml.safe_dump(tree, sort_keys=False))
    torchrun([str(c) for c in configs], nproc=4)
    want = metric_rows(runs / "single")
    for name in meshes:
        got = metric_rows(tmp_path / name)
        assert len(got) == len(want) == 4
        for w, g in zip(want, got):
            assert g["loss"] == pytest.approx(w["loss"], abs=1e-5), (name, w["step"], g["loss"], w["loss"])
            assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4), name
        evals = zip(metric_rows(runs / "single", "eval_loss"), metric_rows(tmp_path / name, "eval_loss"))
        assert all(g["eval_loss"] == pytest.approx(w["eval_loss"], abs=1e-5) for w, g in evals), name
        errors = weight_errors(weights(tmp_path / name / "final"), weights(runs / "single" / "final"))
        assert max(errors.values()) <= 1e-4, (name, errors)


def test_tensor_parallel_resume_through_the_cli_is_exact(runs, tmp_path):
    """`NPROC_PER_NODE=2 tuneforge train ... --resume` continues the TP run's sharded step-2
    checkpoint (2-D DTensors in DCP) and ends exactly where the uninterrupted run ended."""
    work = shutil.copytree(runs / "tp2", tmp_path / "resumed")
    shutil.rmtree(work / "final")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(runs / "tp2.yaml"),
                           "--work-dir", str(work), "--resume"],
                          env=child_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "mesh dp 1 x sp 1 x tp 2" in proc.stderr
    assert "resumed from" in proc.stderr and "step_2" in proc.stderr
    assert losses(work) == losses(runs / "tp2")  # bit for bit
    got, want = weights(work / "final"), weights(runs / "tp2" / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_tensor_parallel_checkpoint_exports_to_plain_transformers(runs, tmp_path):
    from transformers import AutoModelForCausalLM

    ckpt = runs / "tp2" / "checkpoints" / "step_2"
    assert json.loads((ckpt / "state.json").read_text())["format"] == "dcp"
    assert main(["export", str(ckpt), str(tmp_path / "exported")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported", dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(runs / "single" / "checkpoints" / "step_2" / "model",
                                                     dtype=torch.float32).eval()
    errors = weight_errors(exported.state_dict(), reference.state_dict())
    assert max(errors.values()) <= 1e-4, errors
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert (exported(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max() <= 1e-5


# --------------------------------------------------------------------------- pieces, no processes


def test_shard_batch_keeps_targets_positions_and_document_bounds():
    from helpers import make_samples, packed_batch
    from tuneforge.parallel.sequence_parallel import UlyssesGroup, shard_batch

    samples = make_samples(lengths=(5, 9, 3, 7, 4))
    batch = packed_batch(samples, rows=[[0, 1, 2], [3, 4]], row_len=17)  # width 17: padded to 18 for 2 ranks
    shards = [shard_batch(batch, UlyssesGroup(None, 2, rank)) for rank in (0, 1)]
    for key in ("input_ids", "labels", "position_ids"):
        joined = torch.cat([s[key] for s in shards], dim=1)
        assert joined.shape == (2, 18)
        assert torch.equal(joined[:, :17], batch[key])  # nothing moved, no target lost at the cut
    assert torch.equal(torch.cat([s["labels"] for s in shards], 1)[:, 17], torch.full((2,), -100))
    assert sum(s["num_loss_tokens"] for s in shards) == batch["num_loss_tokens"]
    assert sum(s["num_tokens"] for s in shards) == batch["num_tokens"]
    cu = shards[0]["cu_seqlens"].tolist()
    assert cu == shards[1]["cu_seqlens"].tolist() and cu[-1] == 36
    # the original documents keep their bounds, shifted by one padding slot per earlier row
    old = batch["cu_seqlens"].tolist()
    assert [c for c in old if c <= 17] == [c for c in cu if c <= 17]
    assert all(c + 1 in cu for c in old if c > 17)


def test_kv_heads_are_repeated_only_as_far_as_needed():
    from tuneforge.errors import UserError
    from tuneforge.parallel.sequence_parallel import kv_repeats

    assert kv_repeats(8, 8, 4) == 1
    assert kv_repeats(8, 2, 4) == 2
    assert kv_repeats(8, 1, 2) == 2
    assert kv_repeats(12, 4, 3) == 3
    with pytest.raises(UserError, match="larger than the head count allows"):
        kv_repeats(6, 2, 4)


def test_mesh_shape_and_head_checks():
    from tuneforge.config import ParallelConfig
    from tuneforge.errors import UserError
    from tuneforge.parallel.mesh import check_heads, mesh_shape
    from tuneforge.train.run import resolve_strategy

    shape = mesh_shape(16, sequence_parallel=2, tensor_parallel=4)
    assert (shape.dp, shape.sp, shape.tp) == (2, 2, 4)
    assert [shape.coordinates(r) for r in (0, 3, 4, 8, 15)] == [(0, 0, 0), (0, 0, 3), (0, 1, 0), (1, 0, 0), (1, 1, 3)]
    with pytest.raises(UserError, match=r"parallel.sequence_parallel \(2\) x parallel.tensor_parallel \(3\) = 6 "
                                        r"does not divide the world size 8"):
        mesh_shape(8, 2, 3)
    check_heads(32, 8, sequence_parallel=4, tensor_parallel=2)
    with pytest.raises(UserError, match="tensor_parallel 4 does not divide"):
        check_heads(32, 2, tensor_parallel=4)
    with pytest.raises(UserError, match="sequence_parallel 8 is larger than the head count allows"):
        check_heads(4, 2, sequence_parallel=8)
    with pytest.raises(UserError, match="16 heads per tensor-parallel rank"):
        check_heads(32, 8, sequence_parallel=3, tensor_parallel=2)
    assert resolve_strategy(ParallelConfig(tensor_parallel=2), 4) == "fsdp"
    assert resolve_strategy(ParallelConfig(sequence_parallel=2, zero=2), 2) == "fsdp"
    with pytest.raises(UserError, match="need FSDP"):
        resolve_strategy(ParallelConfig(strategy="ddp", sequence_parallel=2), 2)
    with pytest.raises(UserError, match="world size 1"):
        resolve_strategy(ParallelConfig(tensor_parallel=2), 1)
