"""Preemption of a `NPROC_PER_NODE=2 tuneforge train` job: SIGTERM to the launching command
reaches the ranks, they save a checkpoint and stop, the command exits with PREEMPTED_EXIT
(as a single process does), and `--resume` finishes the run. A Ctrl-C at the terminal (SIGINT
to the whole foreground process group) does the same with exit 130, without torchrun's
tracebacks; while the job runs, its work dir is locked by the launching command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

from helpers import alpaca_records, build_tokenizer, make_tiny_model, write_config, write_jsonl
from jobs import child_env
from tuneforge.cli import main
from tuneforge.errors import INTERRUPTED_EXIT, PREEMPTED_EXIT
from tuneforge.parallel.launch import child_pids
from tuneforge.train.checkpoint import latest_checkpoint


def test_sigterm_to_nproc_job_saves_exits_75_and_resumes(tmp_path):
    tokenizer = build_tokenizer()
    model_dir = make_tiny_model(tmp_path / "model", tokenizer)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(400))
    steps = 120
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       train={"max_steps": steps, "save_every": 0, "log_every": 1}, parallel={"strategy": "ddp"})
    env = child_env(NPROC_PER_NODE="2")
    command = [sys.executable, "-m", "tuneforge", "train", str(cfg)]
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
            assert time.time() < deadline and job.poll() is None, "the job did not start training"
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == PREEMPTED_EXIT, out[-2000:]
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert saved is not None and 3 <= int(saved.name.split("_")[1]) < steps
    assert "saved checkpoint at step" in out
    assert "Traceback" not in out and "ChildFailedError" not in out

    resumed = subprocess.run(command + ["--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    assert (tmp_path / "run" / "final").is_dir()


def start_job(tmp_path, steps=120):
    """A 2-rank DDP job started as from a terminal (its own process group), once it trains."""
    tokenizer = build_tokenizer()
    model_dir = make_tiny_model(tmp_path / "model", tokenizer)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(400))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       train={"max_steps": steps, "save_every": 0}, parallel={"strategy": "ddp"})
    job = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg)], env=child_env(NPROC_PER_NODE="2"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        if time.time() > deadline or job.poll() is not None:
            os.killpg(job.pid, signal.SIGKILL)
            raise AssertionError("the job did not start training")
        time.sleep(0.1)
    return job, cfg


def test_ctrl_c_at_the_terminal_saves_and_exits_130_without_tracebacks(tmp_path, capsys):
    steps = 120
    job, cfg = start_job(tmp_path, steps)
    try:
        assert main(["train", str(cfg), "--force"]) == 2  # the running job holds the work dir
        assert f"is in use by pid {job.pid} on " in capsys.readouterr().err
        os.killpg(job.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the foreground group
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == INTERRUPTED_EXIT, out[-2000:]
    saved = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert saved is not None and 3 <= int(saved.name.split("_")[1]) < steps
    assert f"interrupted (Ctrl-C): saved checkpoint at step {saved.name.split('_')[1]}; continue with --resume" in out
    assert "Traceback" not in out and "ChildFailedError" not in out


# workers that note each SIGINT and keep running, under the real relaunch
PATIENT_WORKER = textwrap.dedent("""
    import os, signal, sys, time, pathlib
    out = pathlib.Path(sys.argv[1])
    signal.signal(signal.SIGINT, lambda *a: (out / f"sigint{os.environ['RANK']}").touch())
    (out / f"pid{os.environ['RANK']}").write_text(str(os.getpid()))
    time.sleep(120)
""")
RELAUNCH = textwrap.dedent("""
    import sys
    from tuneforge.parallel.launch import SpawnPlan, free_port, relaunch_with_torchrun
    sys.exit(relaunch_with_torchrun(SpawnPlan(2, 1, 0, "127.0.0.1", free_port()), [sys.argv[1]], target=[sys.argv[2]]))
""")


def wait_for(paths, proc, seconds=60):
    deadline = time.time() + seconds
    while not all(p.exists() for p in paths):
        assert time.time() < deadline and proc.poll() is None, [p.name for p in paths if not p.exists()]
        time.sleep(0.05)


def test_a_second_ctrl_c_kills_the_job_at_once(tmp_path):
    """The first Ctrl-C reaches the ranks (which would save and stop); a second one, once they
    got the first, kills torchrun and the ranks at once: exit 130, nothing left running."""
    (tmp_path / "worker.py").write_text(PATIENT_WORKER)
    (tmp_path / "relaunch.py").write_text(RELAUNCH)
    job = subprocess.Popen([sys.executable, str(tmp_path / "relaunch.py"), str(tmp_path), str(tmp_path / "worker.py")],
                           env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        wait_for([tmp_path / "pid0", tmp_path / "pid1"], job)
        workers = [int((tmp_path / f"pid{rank}").read_text()) for rank in (0, 1)]
        torchrun = child_pids(job.pid)
        os.killpg(job.pid, signal.SIGINT)  # a Ctrl-C at the terminal
        wait_for([tmp_path / "sigint0", tmp_path / "sigint1"], job)  # forwarded to both ranks
        os.killpg(job.pid, signal.SIGINT)  # the second one
        out, _ = job.communicate(timeout=30)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == INTERRUPTED_EXIT, out[-2000:]
    assert "interrupted: stopped at once, nothing more was saved" in out
    assert "Traceback" not in out
    deadline = time.time() + 10
    while any(alive(pid) for pid in torchrun + workers) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in torchrun + workers)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead, not yet reaped
    except OSError:
        return False
