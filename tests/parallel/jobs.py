"""What the multi-process tests share: a clean environment for child jobs, the torchrun
command, runs built once per test session (also under pytest-xdist), and the comparisons
of their metrics and weights against a single process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import write_config
from tuneforge.parallel.launch import free_port

# the launcher variables of the pytest process must not leak into the jobs it starts
CHILD_ENV_DROP = ("SLURM_", "MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_", "TORCHELASTIC_",
                  "NPROC_PER_NODE", "NNODES", "NODE_RANK")
WORKER = Path(__file__).with_name("strategy_worker.py")
MAX_GRAD_NORM = 0.1  # below every step's gradient norm in these runs (full and LoRA): clipping is always active
# The equivalence runs' schedule: 2 ranks x micro 2 x accumulation 2 == 1 process x micro 4 x accumulation 2
TRAIN = {"lr": 1e-3, "warmup_ratio": 0.1, "seed": 3, "max_steps": 4, "micro_batch_size": 2, "gradient_accumulation": 2,
         "max_grad_norm": MAX_GRAD_NORM, "save_every": 2, "keep_last": 2, "eval_every": 2}


def child_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(CHILD_ENV_DROP)}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def torchrun(args: list[str], nproc: int = 2, timeout: float = 400, worker: Path = WORKER) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc_per_node N <worker> args`, checked."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(worker), *args]
    proc = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=timeout)
    check(proc)
    return proc


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the single-process references like the ranks (OMP_NUM_THREADS=1): 2 threads crawl
    when the cores are busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def shared_runs(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder of runs made by `build(root)` once per test session: pytest-xdist workers take
    a file lock, the first builds, the others read (or fail at once if the build failed)."""
    uid = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    root = tmp_path_factory.getbasetemp().parent / f"{name}-{uid}" if uid else tmp_path_factory.getbasetemp() / name
    root.mkdir(exist_ok=True)
    with open(root.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        failed = root / "FAILED"
        if failed.exists():
            pytest.fail(f"building the shared runs failed: {failed.read_text()}")
        if not (root / "DONE").exists():
            try:
                build(root)
            except BaseException as exc:
                failed.write_text(str(exc)[-4000:])
                raise
            (root / "DONE").touch()
    return root


def run_config(root: Path, name: str, model: Path, data: Path, sections: dict | None = None, micro: int = 2) -> Path:
    """root/NAME.yaml for an equivalence run in root/NAME: `TRAIN` with micro-batch `micro`,
    max_length 96 and 10% of the samples held out for eval, updated by `sections`."""
    sections = {k: dict(v) for k, v in (sections or {}).items()}
    sections["train"] = {**TRAIN, "micro_batch_size": micro, "work_dir": str(root / name), **sections.get("train", {})}
    sections["data"] = {"max_length": 96, "eval_split": 0.1, **sections.get("data", {})}
    return write_config(root / f"{name}.yaml", model, [{"path": str(data), "format": "alpaca"}], **sections)


def torchrun_specs(root: Path, model: Path, data: Path, variants: dict[str, tuple[dict, str | None]]) -> None:
    """Train every variant (name -> (config sections, --deepspeed NAME or None)) in one torchrun
    launch of 2 ranks; its output goes to root/worker.log."""
    specs = []
    for name, (sections, deepspeed) in variants.items():
        config = run_config(root, name, model, data, sections)
        specs.append(f"{config}={deepspeed}" if deepspeed else str(config))
    proc = torchrun(specs)
    (root / "worker.log").write_text(proc.stdout + proc.stderr)


def resume_copy_on_two_ranks(runs: Path, name: str, work: Path) -> subprocess.CompletedProcess:
    """Copy the run runs/NAME to `work` without its final/, resume it there through the CLI
    (NPROC_PER_NODE=2, its last checkpoint) and assert it ends bit for bit as the original."""
    import shutil

    from helpers import losses

    shutil.copytree(runs / name, work)
    shutil.rmtree(work / "final")
    proc = subprocess.run([sys.executable, "-m", "tuneforge", "train", str(runs / f"{name}.yaml"),
                           "--work-dir", str(work), "--resume"],
                          env=child_env(NPROC_PER_NODE="2"), capture_output=True, text=True, timeout=300)
    check(proc)
    assert "resumed from" in proc.stderr
    assert losses(work) == losses(runs / name)  # bit for bit
    got, want = weights(work / "final"), weights(runs / name / "final")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return proc


def assert_matches_single(run: Path, reference: Path) -> None:
    """`run` reproduced the single-process `reference`: step losses (|d| <= 1e-5), gradient norms
    (with clipping active), token counts, eval losses and final weights (relative <= 1e-4)."""
    want, got = metric_rows(reference), metric_rows(run)
    assert len(got) == len(want) == 4
    for w, g in zip(want, got):
        assert g["loss"] == pytest.approx(w["loss"], abs=1e-5), (w["step"], g["loss"], w["loss"])
        assert w["grad_norm"] > MAX_GRAD_NORM  # clipping was active, so the global norm mattered
        assert g["grad_norm"] == pytest.approx(w["grad_norm"], rel=1e-4)
        assert g["loss_tokens"] == w["loss_tokens"] and g["tokens"] == w["tokens"]
    want, got = metric_rows(reference, "eval_loss"), metric_rows(run, "eval_loss")
    assert [r["step"] for r in got] == [r["step"] for r in want] == [2, 4]
    for w, g in zip(want, got):
        assert g["eval_loss"] == pytest.approx(w["eval_loss"], abs=1e-5)
    assert_close_weights(weights(run / "final"), weights(reference / "final"))


def weights(folder: Path) -> dict:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def metric_rows(run: Path, kind: str = "loss") -> list[dict]:
    """The rows of metrics.jsonl holding `kind`: "loss" (training steps) or "eval_loss"."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if kind in row]


def weight_errors(got: dict, want: dict) -> dict:
    """Relative error per tensor; the two must hold the same keys."""
    assert got.keys() == want.keys()
    return {key: float((got[key] - want[key]).norm() / want[key].norm()) for key in want}


def assert_close_weights(got: dict, want: dict, rel: float = 1e-4) -> None:
    for key, err in weight_errors(got, want).items():
        assert err <= rel, (key, err)
