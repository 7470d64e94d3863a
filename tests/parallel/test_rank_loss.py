"""One rank of a job dies or hangs: the other exits soon, with one line naming that rank.

Two DDP ranks started as srun would (no torchrun agent to clean up after them). A killed rank
closes its sockets, so the survivor's next collective fails at once; a stopped (hung) rank
is only noticed when `parallel.timeout_s` expires. In both cases the heartbeat counters in
the rendezvous store tell the survivor who stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import alpaca_records, build_tokenizer, make_tiny_model, write_config, write_jsonl
from jobs import child_env
from tuneforge.parallel.heartbeat import LostPeerError
from tuneforge.parallel.launch import free_port


def start_job(tmp_path: Path, timeout_s: float) -> tuple[list[subprocess.Popen], Path]:
    tokenizer = build_tokenizer()
    model_dir = make_tiny_model(tmp_path / "model", tokenizer)
    write_jsonl(tmp_path / "d.jsonl", alpaca_records(400))
    cfg = write_config(tmp_path / "c.yaml", model_dir, [{"path": "d.jsonl", "format": "alpaca"}],
                       train={"max_steps": 100000, "save_every": 0, "log_every": 1},
                       parallel={"strategy": "ddp", "timeout_s": timeout_s})
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = child_env(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                        SLURM_NODELIST="localhost", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg), "--launcher", "slurm"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), "the job did not start training"
        time.sleep(0.2)
    return procs, metrics


def stop_all(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait()


@pytest.mark.parametrize("victim, how, expect", [
    (1, signal.SIGKILL, "rank 1 stopped responding"),
    (0, signal.SIGKILL, "rank 0 (it hosts the rendezvous store) or the launcher is gone"),
    (1, signal.SIGSTOP, "rank 1 stopped responding"),
])
def test_survivor_names_the_lost_rank(tmp_path, victim, how, expect):
    timeout_s = 6.0
    procs, _ = start_job(tmp_path, timeout_s)
    try:
        procs[victim].send_signal(how)
        started = time.time()
        survivor = procs[1 - victim]
        out, _ = survivor.communicate(timeout=90)
        waited = time.time() - started
    finally:
        stop_all(procs)
    last = [line for line in out.splitlines() if line.startswith("error:")]  # on a line of its own
    assert survivor.returncode == LostPeerError.code, out[-2000:]
    assert len(last) == 1 and f"error: rank {1 - victim}: lost the process group: {expect}" in last[0], out[-2000:]
    assert "Traceback" not in out
    # a dead rank is noticed at the next collective; a hung one after the timeout (+ the heartbeat check).
    # The bound is loose (a loaded machine slows every step) but far below parallel.timeout_s's default 1800 s.
    assert waited < (timeout_s + 90 if how == signal.SIGSTOP else 90), waited


HEARTBEAT_EXIT = """
import sys
import torch.distributed as dist
from tuneforge.parallel.heartbeat import Heartbeat
store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
beats = [Heartbeat("127.0.0.1", store.port, 0, 1, prefix="p/", interval_s=0.0).start() for _ in range(4)]
for beat in beats:
    beat.stop()
"""


def test_stopped_heartbeat_lets_the_process_exit_cleanly():
    """A heartbeat thread still inside a store call when the interpreter exits aborts the
    process (SIGABRT, "terminate called without an active exception"), which failed a whole
    job after training had finished. `stop()` must wait for the thread; interval 0 keeps the
    threads inside store calls nearly all the time."""
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", HEARTBEAT_EXIT], env=child_env(), capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 0 and "terminate called" not in proc.stderr, proc.stderr[-2000:]
