"""A user's run is never lost to another command: the work-dir lock (refused at once, naming
the holder; not stuck after a SIGKILL) and `--force`, which validates the new run before it
clears the old one."""

import json
import signal
import subprocess
import sys
import textwrap

import pytest

from tuneforge.cli import main

HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tuneforge.train.workdir_lock import work_dir_lock
    with work_dir_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(600)
""")


def hold_lock(tmp_path, work_dir):
    script = tmp_path / "hold_lock.py"
    script.write_text(HOLD_LOCK)
    proc = subprocess.Popen([sys.executable, str(script), str(work_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_training_refuses_naming_the_holder_and_sigkill_frees_it(run_config, tmp_path, capsys):
    cfg = run_config("locked", train={"max_steps": 1})
    holder = hold_lock(tmp_path, tmp_path / "locked")
    try:
        assert main(["train", str(cfg)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by pid {holder.pid} on " in err[0] and "started 20" in err[0]
        assert main(["train", str(cfg), "--force"]) == 2  # --force does not take a held dir either
        assert sorted(p.name for p in (tmp_path / "locked").iterdir()) == [".lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert main(["train", str(cfg)]) == 0  # the kernel dropped the dead holder's lock
    assert (tmp_path / "locked" / "final").is_dir()


def test_a_run_that_fails_before_starting_leaves_no_work_dir(run_config, tmp_path):
    cfg = run_config("never", train={"max_steps": 1})
    assert main(["train", str(cfg), "model.path=" + str(tmp_path / "no_model")]) != 0
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("override, message", [
    (["data.datasets.0.path={tmp}/typo.jsonll"], "data file not found"),
    (["data.datasets.0.path={tmp}/bad.jsonl"], "bad.jsonl:1"),
    (["data.template=chatmll"], "did you mean 'chatml'"),
    (["model.path={tmp}/no_model"], "model folder not found"),
])
def test_force_validates_before_clearing_the_old_run(run_config, tmp_path, capsys, override, message):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"\n')
    cfg = run_config("kept", train={"max_steps": 2, "save_every": 1})
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "kept"
    before = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert any(p.parts[0] == "checkpoints" for p in before) and any(p.parts[0] == "final" for p in before)
    capsys.readouterr()
    assert main(["train", str(cfg), "--force", *(o.format(tmp=tmp_path) for o in override)]) == 2
    assert message in capsys.readouterr().err
    after = {p.relative_to(run): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file() and p.name != ".lock"}
    assert after == before  # checkpoints/, final/, metrics.jsonl, config.yaml untouched
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
