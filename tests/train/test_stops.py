"""Stops with real signals in a real `tuneforge train` process: a SIGTERM in the last step
finishes the run; Ctrl-C saves and exits 130 (a second one aborts at once); what the
message says exists, exists."""

import signal
import subprocess
import sys
import textwrap
import time

from helpers import losses

from tuneforge.cli import main

# Runs `tuneforge train ARGS...` in this process and, from inside the loop, sends itself the
# listed signals right after metrics.jsonl gets the row of step AT: deterministic timing.
SELF_SIGNAL = textwrap.dedent("""
    import os, signal, sys
    from tuneforge.train.metrics import MetricsLog
    at, names = int(sys.argv[1]), sys.argv[2].split(",")
    write = MetricsLog.write
    def write_then_signal(self, row):
        write(self, row)
        if row.get("step") == at and "loss" in row:
            for name in names:
                os.kill(os.getpid(), getattr(signal, name))
    MetricsLog.write = write_then_signal
    from tuneforge.cli import main
    raise SystemExit(main(sys.argv[3:]))
""")


def train_signalled(tmp_path, cfg, at, names, *extra):
    script = tmp_path / "self_signal.py"
    script.write_text(SELF_SIGNAL)
    return subprocess.run([sys.executable, str(script), str(at), ",".join(names), "train", str(cfg), *extra],
                          capture_output=True, text=True, timeout=300)


def test_sigterm_in_the_last_step_finishes_the_run(run_config, tmp_path):
    cfg = run_config("last", train={"max_steps": 3, "save_every": 0})
    done = train_signalled(tmp_path, cfg, 3, ["SIGTERM"])
    assert done.returncode == 0, done.stderr
    assert "SIGTERM arrived in the last step" in done.stderr
    assert (tmp_path / "last" / "final" / "config.json").is_file()
    assert "continue with --resume" not in done.stderr
    assert len(losses(tmp_path / "last")) == 3


def test_sigusr1_before_the_last_step_saves_what_it_says(run_config, tmp_path):
    cfg = run_config("early", train={"max_steps": 4, "save_every": 0})
    done = train_signalled(tmp_path, cfg, 2, ["SIGUSR1"])
    assert done.returncode == 75, done.stderr
    assert "received SIGUSR1: saved checkpoint at step 2; continue with --resume" in done.stderr
    assert sorted(p.name for p in (tmp_path / "early" / "checkpoints").iterdir()) == ["step_2"]
    assert not (tmp_path / "early" / "final").exists()


def test_ctrl_c_saves_and_exits_130_then_resumes_to_the_same_losses(run_config, tmp_path):
    sections = dict(train={"max_steps": 24, "save_every": 0})
    assert main(["train", str(run_config("whole", **sections))]) == 0
    reference = losses(tmp_path / "whole")

    cfg = run_config("ctrlc", **sections)
    metrics = tmp_path / "ctrlc" / "metrics.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "tuneforge", "train", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)  # a real Ctrl-C, from outside
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    saved = sorted((tmp_path / "ctrlc" / "checkpoints").iterdir())
    assert len(saved) == 1
    step = int(saved[0].name.removeprefix("step_"))
    assert 2 <= step < 24
    assert f"interrupted (Ctrl-C): saved checkpoint at step {step}; continue with --resume" in err
    assert "Traceback" not in err
    assert main(["train", str(cfg), "--resume"]) == 0
    assert losses(tmp_path / "ctrlc") == reference


def test_a_second_ctrl_c_aborts_at_once(run_config, tmp_path):
    cfg = run_config("twice", train={"max_steps": 6, "save_every": 0})
    done = train_signalled(tmp_path, cfg, 2, ["SIGINT", "SIGINT"])
    assert done.returncode == 130, done.stderr
    assert "interrupted: stopped at once, nothing more was saved" in done.stderr
    assert "saved checkpoint" not in done.stderr
    assert not (tmp_path / "twice" / "checkpoints").exists()
    assert not (tmp_path / "twice" / "final").exists()


def test_signal_handlers_are_given_back_after_a_run(run_config):
    before = signal.getsignal(signal.SIGINT)
    assert main(["train", str(run_config("handlers", train={"max_steps": 1}))]) == 0
    assert signal.getsignal(signal.SIGINT) is before  # this process gets its own Ctrl-C back
